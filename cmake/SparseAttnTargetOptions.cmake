# Flags for the project's own executables (tests, benchmarks, tools, examples). The INTERFACE
# library carries none of these: an includer's flags decide its ISA paths and warnings.
include(CheckCXXCompilerFlag)

if(SPARSE_ATTN_ARCH)
  set(SPARSE_ATTN_ARCH_FLAG -march=${SPARSE_ATTN_ARCH})  # e.g. sapphirerapids for another host
elseif(SPARSE_ATTN_NATIVE)
  set(SPARSE_ATTN_ARCH_FLAG -march=native)
else()
  set(SPARSE_ATTN_ARCH_FLAG -march=x86-64-v2)  # portable baseline: SSE4.2, no AVX
endif()
string(MAKE_C_IDENTIFIER "${SPARSE_ATTN_ARCH_FLAG}" _sparse_attn_arch_id)
check_cxx_compiler_flag(${SPARSE_ATTN_ARCH_FLAG} SPARSE_ATTN_HAS_ARCH_FLAG${_sparse_attn_arch_id})
if(NOT SPARSE_ATTN_HAS_ARCH_FLAG${_sparse_attn_arch_id})
  message(WARNING "sparse_attn: compiler does not accept ${SPARSE_ATTN_ARCH_FLAG}; using its default")
  set(SPARSE_ATTN_ARCH_FLAG "")
endif()
message(STATUS "sparse_attn: own targets built with '${SPARSE_ATTN_ARCH_FLAG}'")

# sparse_attn_target_options(<target> [FAST_BUILD])
#   warnings as errors, the ISA flag, and link to the library. FAST_BUILD caps optimisation at -O2
#   (tests: header-only code compiles slowly; -O2 is later on the command line, so it wins).
function(sparse_attn_target_options target)
  cmake_parse_arguments(ARG "FAST_BUILD" "" "" ${ARGN})
  target_link_libraries(${target} PRIVATE sparse_attn::sparse_attn)
  target_compile_features(${target} PRIVATE cxx_std_17)
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Werror
                                             ${SPARSE_ATTN_ARCH_FLAG})
    # GCC < 13 warns about _mm512_undefined_*() inside its own AVX-512 intrinsics (GCC PR 105593).
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
    if(ARG_FAST_BUILD)
      target_compile_options(${target} PRIVATE $<$<CONFIG:Release>:-O2>)
    endif()
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4 /WX)
  endif()
endfunction()
