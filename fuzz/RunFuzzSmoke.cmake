# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCLANG_CXX=...] [-DGENERATOR=...] [-DSECONDS=30]
#       [-DRUNS=5000] [-DSEED=1] -P RunFuzzSmoke.cmake
# Builds fuzz/fuzz_attention and fuzz/fuzz_npy with clang (clang++-14 preferred; libFuzzer + ASan +
# UBSan) and runs them for a bounded time over the seed corpora fuzz/corpus and fuzz/corpus_npy. Prints "fuzz_smoke: SKIPPED" (ctest
# reports the test as skipped) when no clang with the libFuzzer runtime is installed
# (Debian: clang-14 libclang-rt-14-dev). New corpus units and crash inputs go to WORK_DIR.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunFuzzSmoke: ${v} not set")
  endif()
endforeach()
if(NOT DEFINED SECONDS)
  set(SECONDS 30)
endif()
if(NOT DEFINED RUNS)
  set(RUNS 5000)
endif()
# A fixed seed: the smoke test is a regression check whose failures must reproduce from the log
# (run the fuzzer with -seed=N on the same corpus). Exploration with fresh seeds is a longer run
# of its own (docs/ROBUSTNESS.md, section "Fuzzing").
if(NOT DEFINED SEED)
  set(SEED 1)
endif()

if(NOT CLANG_CXX)
  find_program(CLANG_CXX NAMES clang++-14 clang++)
endif()
if(NOT CLANG_CXX)
  message("fuzz_smoke: SKIPPED: clang++-14 not found (apt-get install clang-14 libclang-rt-14-dev)")
  return()
endif()
# Does this clang link libFuzzer + ASan + UBSan?
file(MAKE_DIRECTORY ${WORK_DIR})
file(WRITE ${WORK_DIR}/probe.cpp
     "#include <cstddef>\n#include <cstdint>\n"
     "extern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }\n")
execute_process(COMMAND ${CLANG_CXX} -fsanitize=fuzzer,address,undefined ${WORK_DIR}/probe.cpp
                        -o ${WORK_DIR}/probe
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
if(NOT rc EQUAL 0)
  message("fuzz_smoke: SKIPPED: ${CLANG_CXX} cannot link -fsanitize=fuzzer,address,undefined "
          "(install libclang-rt-14-dev)")
  return()
endif()

set(build_dir ${WORK_DIR}/build)
set(args -S ${SOURCE_DIR} -B ${build_dir} -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=${CLANG_CXX}
         -DSPARSE_ATTN_BUILD_FUZZERS=ON -DSPARSE_ATTN_BUILD_TESTS=OFF -DSPARSE_ATTN_BUILD_TOOLS=OFF
         -DSPARSE_ATTN_BUILD_BENCHMARKS=OFF -DSPARSE_ATTN_BUILD_EXAMPLES=OFF
         -DSPARSE_ATTN_INSTALL=OFF)
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()
# Shared by both fuzzers: UB aborts; crash inputs are saved in WORK_DIR.
set(run_env ${CMAKE_COMMAND} -E env UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1)
set(run_flags -seed=${SEED} -timeout=60 -rss_limit_mb=4096 -print_final_stats=1
              -artifact_prefix=${WORK_DIR}/)
# Quoted: an unquoted word in if() is dereferenced when a variable of that name exists.
foreach(step configure build run run_npy)
  if(step STREQUAL "configure")
    set(cmd ${CMAKE_COMMAND} ${args})
  elseif(step STREQUAL "build")
    set(cmd ${CMAKE_COMMAND} --build ${build_dir} --target fuzz_attention fuzz_npy -j2)
  elseif(step STREQUAL "run")
    # New units go to WORK_DIR/corpus (the first directory); the seeds are only read.
    file(MAKE_DIRECTORY ${WORK_DIR}/corpus)
    set(cmd ${run_env} ${build_dir}/fuzz/fuzz_attention -max_total_time=${SECONDS} -runs=${RUNS}
            -max_len=512 ${run_flags} ${WORK_DIR}/corpus ${SOURCE_DIR}/fuzz/corpus)
  else()
    # The file parsers: fast (thousands of inputs per second), so a few seconds suffice here.
    file(MAKE_DIRECTORY ${WORK_DIR}/corpus_npy)
    set(cmd ${run_env} TMPDIR=${WORK_DIR} ${build_dir}/fuzz/fuzz_npy -max_total_time=10
            -max_len=4096 ${run_flags} ${WORK_DIR}/corpus_npy ${SOURCE_DIR}/fuzz/corpus_npy)
  endif()
  if(step MATCHES "^run")
    # The fuzzers' output goes to a log: on failure its tail and the failing input (hex) end the
    # message, so a CI summary that keeps only the last lines still shows what failed and how to
    # reproduce it.
    set(log ${WORK_DIR}/${step}.log)
    file(REMOVE ${log})
    file(GLOB old_artifacts ${WORK_DIR}/crash-* ${WORK_DIR}/timeout-* ${WORK_DIR}/oom-*
                            ${WORK_DIR}/leak-* ${WORK_DIR}/slow-unit-*)
    if(old_artifacts)
      file(REMOVE ${old_artifacts})
    endif()
    execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_FILE ${log} ERROR_FILE ${log})
  else()
    execute_process(COMMAND ${cmd} RESULT_VARIABLE rc)
  endif()
  if(NOT rc EQUAL 0)
    set(report "")
    if(step MATCHES "^run" AND EXISTS ${log})
      file(STRINGS ${log} lines)
      list(LENGTH lines n)
      # The fuzzer's own report (stack, "SUMMARY:", the case notes) follows its last status line.
      set(first 0)
      if(n GREATER 120)
        math(EXPR first "${n} - 120")
      endif()
      list(SUBLIST lines ${first} -1 tail)
      list(JOIN tail "\n" tail)
      string(APPEND report "\n--- last lines of ${log} ---\n${tail}\n")
      file(GLOB artifacts ${WORK_DIR}/crash-* ${WORK_DIR}/timeout-* ${WORK_DIR}/oom-*
                          ${WORK_DIR}/leak-*)
      foreach(a ${artifacts})
        file(READ ${a} hex HEX)
        string(APPEND report "--- failing input ${a} (hex; xxd -r -p to rebuild) ---\n${hex}\n")
      endforeach()
    endif()
    message(FATAL_ERROR "fuzz_smoke: step '${step}' failed (${rc}); a crash input, if any, is in "
                        "${WORK_DIR}/ (crash-*); reproduce: fuzz_attention|fuzz_npy <file>${report}")
  endif()
endforeach()
message(STATUS "fuzz_smoke: OK")
