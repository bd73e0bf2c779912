// flare-rt's native CUDA kernels (see README.md beside this file).
//
// One source, two compilers: CMake/nvcc builds it ahead of time into flare_kernels.fatbin (shipped
// with the package), and where that holds no code for the GPU, CuPy compiles this same text at run
// time with NVRTC. So: no #include (NVRTC has no toolkit headers), extern "C" entry points (no name
// mangling), one fp32 and one fp16 entry point per kernel from one template.
//
// Arithmetic is bit-exact with the numpy/CuPy code each kernel replaces: every float operation the
// library path performs is written below as one explicit IEEE-754 round-to-nearest PTX instruction
// without .ftz, so neither FMA contraction (--fmad) nor flush-to-zero (-ftz, which CuPy always passes
// to NVRTC) can change a bit, whichever compiler built the module.

typedef unsigned char u8;
typedef unsigned short f16bits;  // IEEE half, as raw bits (converted exactly with cvt.f32.f16)
typedef long long i64;

#define IEEE_OP(name, ptx)                                                   \
    __device__ __forceinline__ float name(float a, float b) {                \
        float r;                                                             \
        asm(ptx " %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));                  \
        return r;                                                            \
    }
IEEE_OP(mul_rn, "mul.rn.f32")
IEEE_OP(add_rn, "add.rn.f32")
IEEE_OP(sub_rn, "sub.rn.f32")
IEEE_OP(div_rn, "div.rn.f32")

// Comparisons without .ftz: a subnormal compares as itself, as on the CPU.
#define IEEE_CMP(name, ptx)                                                  \
    __device__ __forceinline__ bool name(float a, float b) {                 \
        unsigned int r;                                                      \
        asm("{\n\t.reg .pred p;\n\t" ptx " p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" \
            : "=r"(r) : "f"(a), "f"(b));                                     \
        return r != 0;                                                       \
    }
IEEE_CMP(gt, "setp.gt.f32")
IEEE_CMP(eq, "setp.eq.f32")
IEEE_CMP(unordered, "setp.nan.f32")
__device__ __forceinline__ bool isnan_(float a) { return unordered(a, a); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16bits h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// numpy's argmax step: the first maximum wins ties, and the first NaN is the maximum.
__device__ __forceinline__ void argmax_step(float v, int j, float& best, int& idx) {
    if (!isnan_(best) && (gt(v, best) || isnan_(v))) {
        best = v;
        idx = j;
    }
}

// ------------------------------------------------------------------------------------------------
// labels_from_logits: fused bilinear resize + argmax (postprocess.refine_plane, for many slices).
//
// out[i, yo, xo] = argmax_k of the bilinearly resized logits[k, src[i]] at (yo, xo), computed as
// refine_plane does: where the network-resolution argmax of the four neighbours a, b, c, d agrees,
// that label; elsewhere the argmax of (1-wy)*((1-wx)*a + wx*b) + wy*((1-wx)*c + wx*d) in float32.
// The sample tables (ylo, yhi, wy; xlo, xhi, wx) are resample.linear_weights' (float32 weights), as
// refine_plane uses them, computed on the host. With `weights` (the blend's weight sum, same rows and
// plane as the logits), the values are first normalised as window.sliding_window_blocks emits them:
// where(w > 0, acc / max(w, 1e-30), 0), and with `empty_background` class 0 gets 1 where w == 0.
// Strides are in elements and may be any value (the logits are typically an un-padding view of the
// blend buffer).
// ------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float logit_value(const T* __restrict__ logits, i64 off, bool weighted,
                                             float w, bool empty_background, int k) {
    const float v = to_f32(logits[off]);
    if (!weighted) return v;
    if (gt(w, 0.0f)) return div_rn(v, gt(w, 1e-30f) ? w : 1e-30f);
    return (empty_background && k == 0 && eq(w, 0.0f)) ? 1.0f : 0.0f;
}

template <typename T>
__device__ __forceinline__ void labels_from_logits_impl(
    const T* __restrict__ logits, int K, i64 sk, i64 sz, i64 sy, i64 sx,
    const float* __restrict__ weights, i64 wsz, i64 wsy, i64 wsx, int empty_background,
    const int* __restrict__ src, int n,
    const int* __restrict__ ylo, const int* __restrict__ yhi, const float* __restrict__ wyt, int Yo,
    const int* __restrict__ xlo, const int* __restrict__ xhi, const float* __restrict__ wxt, int Xo,
    u8* __restrict__ out) {
    const int xo = blockIdx.x * blockDim.x + threadIdx.x;
    const int yo = blockIdx.y * blockDim.y + threadIdx.y;
    const int i = blockIdx.z;
    if (xo >= Xo || yo >= Yo || i >= n) return;
    const i64 s = src[i];
    const int y0 = ylo[yo], y1 = yhi[yo], x0 = xlo[xo], x1 = xhi[xo];
    const float wy = wyt[yo], wx = wxt[xo];
    const float uy = sub_rn(1.0f, wy), ux = sub_rn(1.0f, wx);
    const i64 oa = s * sz + y0 * sy + x0 * sx, ob = s * sz + y0 * sy + x1 * sx;
    const i64 oc = s * sz + y1 * sy + x0 * sx, od = s * sz + y1 * sy + x1 * sx;
    const bool weighted = weights != 0;
    float wa = 0.0f, wb = 0.0f, wc = 0.0f, wd = 0.0f;
    if (weighted) {
        wa = weights[s * wsz + y0 * wsy + x0 * wsx];
        wb = weights[s * wsz + y0 * wsy + x1 * wsx];
        wc = weights[s * wsz + y1 * wsy + x0 * wsx];
        wd = weights[s * wsz + y1 * wsy + x1 * wsx];
    }
    const bool eb = empty_background != 0;
    float ba = 0.0f, bb = 0.0f, bc = 0.0f, bd = 0.0f, bi = 0.0f;
    int ia = 0, ib = 0, ic = 0, id = 0, ii = 0;
    for (int k = 0; k < K; ++k) {
        const i64 o = k * sk;
        const float a = logit_value(logits, o + oa, weighted, wa, eb, k);
        const float b = logit_value(logits, o + ob, weighted, wb, eb, k);
        const float c = logit_value(logits, o + oc, weighted, wc, eb, k);
        const float d = logit_value(logits, o + od, weighted, wd, eb, k);
        const float top = add_rn(mul_rn(ux, a), mul_rn(wx, b));
        const float bottom = add_rn(mul_rn(ux, c), mul_rn(wx, d));
        const float v = add_rn(mul_rn(uy, top), mul_rn(wy, bottom));
        if (k == 0) {
            ba = a; bb = b; bc = c; bd = d; bi = v;
        } else {
            argmax_step(a, k, ba, ia);
            argmax_step(b, k, bb, ib);
            argmax_step(c, k, bc, ic);
            argmax_step(d, k, bd, id);
            argmax_step(v, k, bi, ii);
        }
    }
    const bool agree = ia == ib && ia == ic && ia == id;
    out[((i64)i * Yo + yo) * Xo + xo] = (u8)(agree ? ia : ii);
}

#define LABELS_ARGS(T)                                                                              \
    const T* __restrict__ logits, int K, i64 sk, i64 sz, i64 sy, i64 sx,                            \
        const float* __restrict__ weights, i64 wsz, i64 wsy, i64 wsx, int empty_background,        \
        const int* __restrict__ src, int n, const int* __restrict__ ylo, const int* __restrict__ yhi, \
        const float* __restrict__ wyt, int Yo, const int* __restrict__ xlo,                         \
        const int* __restrict__ xhi, const float* __restrict__ wxt, int Xo, u8* __restrict__ out
#define LABELS_CALL                                                                                  \
    labels_from_logits_impl(logits, K, sk, sz, sy, sx, weights, wsz, wsy, wsx, empty_background, src, n, \
                            ylo, yhi, wyt, Yo, xlo, xhi, wxt, Xo, out)

extern "C" __global__ void labels_from_logits_f32(LABELS_ARGS(float)) { LABELS_CALL; }
extern "C" __global__ void labels_from_logits_f16(LABELS_ARGS(f16bits)) { LABELS_CALL; }

// ------------------------------------------------------------------------------------------------
// accumulate_tiles: Gaussian-weighted scatter of a batch of tile predictions into the blend buffer
// (window.sliding_window_blocks' `p *= gauss; acc[...] += p; wsum[...] += gauss` per tile).
//
// One thread owns one voxel (z, y, x) of the batch's bounding box and adds the tiles covering it in
// batch order, so each voxel sees exactly the CPU path's sequence of float32 operations
// (acc = acc + p * g, wsum = wsum + g, tile after tile): results are bit-identical, deterministic,
// and need no atomics. At most 64 tiles per launch (a 64-bit coverage mask); the caller splits
// larger batches into launches on one stream, which keeps the order.
// ------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void accumulate_tiles_impl(
    float* __restrict__ acc, float* __restrict__ wsum, int K, int D, int Y, int X,
    const T* __restrict__ pred, const float* __restrict__ gauss, int pz, int py, int px,
    const int* __restrict__ origins, int B, int bz0, int by0, int bx0, int bny, int bnx) {
    const int x = bx0 + blockIdx.x * blockDim.x + threadIdx.x;
    const int y = by0 + blockIdx.y * blockDim.y + threadIdx.y;
    const int z = bz0 + blockIdx.z;
    if (x >= bx0 + bnx || y >= by0 + bny) return;
    unsigned long long cover = 0ull;
    for (int b = 0; b < B; ++b) {
        const unsigned int dz = (unsigned int)(z - origins[3 * b]);
        const unsigned int dy = (unsigned int)(y - origins[3 * b + 1]);
        const unsigned int dx = (unsigned int)(x - origins[3 * b + 2]);
        if (dz < (unsigned int)pz && dy < (unsigned int)py && dx < (unsigned int)px) cover |= 1ull << b;
    }
    if (cover == 0ull) return;
    const i64 plane = (i64)Y * X, volume = (i64)D * plane, tile = (i64)pz * py * px;
    const i64 v = (i64)z * plane + (i64)y * X + x;
    // offset of this voxel inside tile b
    auto in_tile = [&](int b) -> i64 {
        return ((i64)(z - origins[3 * b]) * py + (y - origins[3 * b + 1])) * px + (x - origins[3 * b + 2]);
    };
    float w = wsum[v];
    for (int b = 0; b < B; ++b) {
        if ((cover >> b) & 1ull) w = add_rn(w, gauss[in_tile(b)]);
    }
    wsum[v] = w;
    for (int k = 0; k < K; ++k) {
        float a = acc[k * volume + v];
        for (int b = 0; b < B; ++b) {
            if (!((cover >> b) & 1ull)) continue;
            const i64 t = in_tile(b);
            a = add_rn(a, mul_rn(to_f32(pred[((i64)b * K + k) * tile + t]), gauss[t]));
        }
        acc[k * volume + v] = a;
    }
}

#define ACCUMULATE_ARGS(T)                                                                          \
    float* __restrict__ acc, float* __restrict__ wsum, int K, int D, int Y, int X,                  \
        const T* __restrict__ pred, const float* __restrict__ gauss, int pz, int py, int px,        \
        const int* __restrict__ origins, int B, int bz0, int by0, int bx0, int bny, int bnx
#define ACCUMULATE_CALL \
    accumulate_tiles_impl(acc, wsum, K, D, Y, X, pred, gauss, pz, py, px, origins, B, bz0, by0, bx0, bny, bnx)

extern "C" __global__ void accumulate_tiles_f32(ACCUMULATE_ARGS(float)) { ACCUMULATE_CALL; }
extern "C" __global__ void accumulate_tiles_f16(ACCUMULATE_ARGS(f16bits)) { ACCUMULATE_CALL; }
