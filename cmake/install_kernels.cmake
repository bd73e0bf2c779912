# Build step of CMakeLists.txt (cmake -P): copy the fatbin into the package folder and write its
# manifest, flare_kernels.json, which the loader reads (which architectures hold cubins, which PTX)
# and a test checks (the source's sha256 must match the committed source: a stale fatbin fails).
# Both files are written under a temporary name and renamed, so a failed build leaves the old pair.
foreach(var SOURCE FATBIN DEST NVCC ARCHS FLAGS STAMP)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_kernels.cmake: -D${var}=... is required")
  endif()
endforeach()

file(SHA256 "${SOURCE}" source_sha256)
file(SHA256 "${FATBIN}" fatbin_sha256)
execute_process(COMMAND "${NVCC}" --version OUTPUT_VARIABLE nvcc_out RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT nvcc_out MATCHES "V([0-9]+\\.[0-9]+\\.[0-9]+)")
  message(FATAL_ERROR "cannot read the version of ${NVCC}: ${nvcc_out}")
endif()
set(nvcc_version "${CMAKE_MATCH_1}")

list(GET ARCHS -1 newest)
list(JOIN ARCHS ", " sass)
set(flag_items "")
foreach(f IN LISTS FLAGS)
  list(APPEND flag_items "\"${f}\"")
endforeach()
list(JOIN flag_items ", " flags_json)
get_filename_component(source_name "${SOURCE}" NAME)

set(json "{
  \"source\": \"${source_name}\",
  \"source_sha256\": \"${source_sha256}\",
  \"fatbin\": \"flare_kernels.fatbin\",
  \"fatbin_sha256\": \"${fatbin_sha256}\",
  \"sass\": [${sass}],
  \"ptx\": [${newest}],
  \"nvcc\": \"${nvcc_version}\",
  \"flags\": [${flags_json}]
}
")

file(MAKE_DIRECTORY "${DEST}")
string(RANDOM LENGTH 8 token)
set(tmp_bin "${DEST}/.flare_kernels.${token}.partial.fatbin")
set(tmp_json "${DEST}/.flare_kernels.${token}.partial.json")
file(COPY_FILE "${FATBIN}" "${tmp_bin}")
file(WRITE "${tmp_json}" "${json}")
file(RENAME "${tmp_bin}" "${DEST}/flare_kernels.fatbin")
file(RENAME "${tmp_json}" "${DEST}/flare_kernels.json")
file(TOUCH "${STAMP}")
message(STATUS "flare_kernels.fatbin (sm ${sass} + compute_${newest} PTX, nvcc ${nvcc_version}) -> ${DEST}")
