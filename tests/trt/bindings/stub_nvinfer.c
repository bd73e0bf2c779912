/* Stand-ins for the C entry points that NVIDIA's TensorRT Python bindings (tensorrt_bindings/tensorrt.so, a
 * PyPI wheel) link against in libnvinfer, libnvinfer_plugin and libnvonnxparser, whose real libraries come
 * only from NVIDIA's index. With these the real bindings import on a machine without TensorRT: the tests
 * read the real API (classes, signatures, enums) and run flare-rt's TensorRT code against it.
 *
 * Every factory does what TensorRT does when CUDA cannot start (a driver older than its CUDA, no visible
 * GPU): it reports through the caller's ILogger and returns no object. TensorRT 10 reports that as a
 * warning, "CUDA initialization failure with error: 35. Please check your CUDA installation".
 *
 * Built three times per TensorRT major N, with the sonames libnvinfer.so.N, libnvinfer_plugin.so.N and
 * libnvonnxparser.so.N, and LOG_SLOT, the vtable slot of ILogger::log in that major (tests/trt/trt_bindings.py):
 * 0 in TensorRT 10, where log() is ILogger's first virtual function; 4 in TensorRT 11, where ILogger is a
 * versioned interface (getAPILanguage, getInterfaceInfo and the two destructor entries come first). */
#include <stddef.h>
#include <stdint.h>

/* nvinfer1::ILogger::Severity::kWARNING */
#define SEVERITY_WARNING 2

static const char MESSAGE[] = "CUDA initialization failure with error: 35. Please check your CUDA installation "
                              "(stub libnvinfer of the flare-rt tests: no TensorRT libraries here)";

#ifndef LOG_SLOT
#error "define LOG_SLOT, the vtable slot of nvinfer1::ILogger::log(Severity, AsciiChar const*)"
#endif

typedef void (*log_fn)(void *self, int32_t severity, const char *msg);

static void report(void *logger)
{
    if (logger != NULL) {
        log_fn log = (*(log_fn **)logger)[LOG_SLOT];
        log(logger, SEVERITY_WARNING, MESSAGE);
    }
}

void *createInferBuilder_INTERNAL(void *logger, int32_t version) { (void)version; report(logger); return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int32_t version) { (void)version; report(logger); return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int32_t version)
{
    (void)engine; (void)version; report(logger); return NULL;
}
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int32_t version)
{
    (void)network; (void)version; report(logger); return NULL;
}
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int32_t version)
{
    (void)refitter; (void)version; report(logger); return NULL;
}
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int32_t capability) { (void)capability; return NULL; }
int32_t getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *name_space) { (void)logger; (void)name_space; return 0; }
