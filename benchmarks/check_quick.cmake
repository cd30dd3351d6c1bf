# ctest bench_quick_smoke: runs `sparse_attn_bench --quick` once and checks its JSON output.
#   cmake -DBENCH=<sparse_attn_bench> -DOUT=<file.json> -P check_quick.cmake
# Checks (no timing assertions): the run exits 0; every roofline, prefill and decode family ran;
# every prefill and decode benchmark is named <phase>/<method>/n:<N>/cr:<CR>/<dtype> (every
# method, FlexPrefill included, is swept over target CRs); every counter of every benchmark is a
# finite number > 0; the only benchmark allowed to report an error is roofline/bf16_dot_peak on a
# CPU or build without AVX512-BF16.
cmake_minimum_required(VERSION 3.19)  # string(JSON)

if(NOT BENCH OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DBENCH=<sparse_attn_bench> -DOUT=<file.json> -P check_quick.cmake")
endif()

file(REMOVE "${OUT}")
execute_process(
  COMMAND "${BENCH}" --quick --no-progress --benchmark_out=${OUT} --benchmark_out_format=json
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "sparse_attn_bench --quick exited with '${rc}'")
endif()
if(NOT EXISTS "${OUT}")
  message(FATAL_ERROR "sparse_attn_bench --quick wrote no ${OUT}")
endif()
file(READ "${OUT}" json)

# Google Benchmark writes non-finite doubles as bare NaN / Infinity (not JSON): catch them first.
if(json MATCHES "(: *-?NaN|: *-?Infinity|: *-?nan|: *-?inf)")
  message(FATAL_ERROR "a counter is not finite (${CMAKE_MATCH_1}) in ${OUT}")
endif()

# Keys of a run that are not user counters.
set(standard_keys name family_index per_family_instance_index run_name run_type repetitions
    repetition_index threads iterations real_time cpu_time time_unit label error_occurred
    error_message aggregate_name aggregate_unit big_o rms)

string(JSON count LENGTH "${json}" benchmarks)
if(count EQUAL 0)
  message(FATAL_ERROR "no benchmark ran")
endif()
set(seen "")
set(checked 0)
math(EXPR last "${count} - 1")
foreach(i RANGE ${last})
  string(JSON name GET "${json}" benchmarks ${i} name)
  string(JSON err ERROR_VARIABLE no_err GET "${json}" benchmarks ${i} error_occurred)
  if(err STREQUAL "ON" OR err STREQUAL "true" OR err STREQUAL "TRUE")
    string(JSON msg GET "${json}" benchmarks ${i} error_message)
    if(name STREQUAL "roofline/bf16_dot_peak" AND msg MATCHES "AVX512BF16")
      message(STATUS "skipped: ${name}: ${msg}")
      continue()
    endif()
    message(FATAL_ERROR "${name} reported an error: ${msg}")
  endif()
  if(name MATCHES "^(prefill|decode)/" AND
     NOT name MATCHES "^(prefill|decode)/[a-z0-9_]+/n:[0-9]+/cr:[0-9.]+/(fp32|bf16|bf16kv)$")
    message(FATAL_ERROR "${name}: not named <phase>/<method>/n:<N>/cr:<CR>/<fp32|bf16|bf16kv>")
  endif()
  # Family = the first two path components (roofline/fma_peak, prefill/dense, ...).
  string(REGEX MATCH "^[^/]+/[^/]+" family "${name}")
  list(APPEND seen "${family}")
  string(JSON nkeys LENGTH "${json}" benchmarks ${i})
  math(EXPR klast "${nkeys} - 1")
  set(counters "")
  foreach(j RANGE ${klast})
    string(JSON key MEMBER "${json}" benchmarks ${i} ${j})
    if(key IN_LIST standard_keys)
      continue()
    endif()
    string(JSON type TYPE "${json}" benchmarks ${i} ${key})
    string(JSON value GET "${json}" benchmarks ${i} ${key})
    if(NOT type STREQUAL "NUMBER")
      message(FATAL_ERROR "${name}: counter ${key} = '${value}' is not a number")
    endif()
    # Finite by the NaN/Infinity scan above; > 0: no sign, and some non-zero digit in the mantissa.
    if(value MATCHES "^-")
      message(FATAL_ERROR "${name}: counter ${key} = ${value} is not > 0")
    endif()
    string(REGEX MATCH "^[0-9.]+" mantissa "${value}")
    if(NOT mantissa MATCHES "[1-9]")
      message(FATAL_ERROR "${name}: counter ${key} = ${value} is not > 0")
    endif()
    list(APPEND counters "${key}")
    math(EXPR checked "${checked} + 1")
  endforeach()
  if(NOT counters)
    message(FATAL_ERROR "${name}: no counters")
  endif()
endforeach()

foreach(family roofline/fma_peak roofline/stream_read roofline/eigen_gemm prefill/dense
        prefill/sliding_window prefill/flex_prefill prefill/user_mask decode/dense
        decode/sliding_window decode/h2o)
  if(NOT family IN_LIST seen)
    message(FATAL_ERROR "no ${family} benchmark ran")
  endif()
endforeach()
list(REMOVE_DUPLICATES seen)
list(LENGTH seen nfam)
message(STATUS "bench_quick_smoke: ${count} benchmarks, ${nfam} families, ${checked} counters, all finite and > 0")
