# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DCXX_COMPILER=...] [-DGENERATOR=...] -P RunMultiArchTest.cmake
# Builds tests/multi_arch: one translation unit compiled at -march=x86-64-v2 and at
# -march=x86-64-v3, linked into one program with a portable main. Then checks the symbol invariant
# that makes this safe: no external symbol of namespace sparse_attn is defined by both objects
# (each lives in its own ISA-tagged inline namespace, core/config.hpp), so the linker cannot keep
# one object's copy of a function and hand it to the other's callers. The ctest test multi_arch
# (tests/CMakeLists.txt) then runs WORK_DIR/build/multi_arch, which checks both copies against the
# double-precision oracle, or exits 77 (skipped) on a CPU without x86-64-v3.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunMultiArchTest: ${v} not set")
  endif()
endforeach()

set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})
set(args -S ${SOURCE_DIR}/tests/multi_arch -B ${build} -DCMAKE_BUILD_TYPE=Release
         -DSPARSE_ATTN_SOURCE_DIR=${SOURCE_DIR})
if(GENERATOR)
  list(APPEND args -G ${GENERATOR})
endif()
if(CXX_COMPILER)
  list(APPEND args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

set(RUN_STEP_JOB multi_arch_objects)
include(${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake)

run_step(configure ${CMAKE_COMMAND} ${args})
run_step(build ${CMAKE_COMMAND} --build ${build} --config Release -j2)
include(${build}/multi_arch_objects-Release.cmake)  # V2_OBJECT, V3_OBJECT, NM

# external_symbols(<object> <out>): the demangled names of the symbols of namespace sparse_attn
# (or with a template argument from it) that <object> defines with external linkage: global, weak,
# unique or indirect (ifunc), i.e. every symbol the linker may merge with another object's. Local
# symbols (lowercase types but u, v, w, i) cannot clash and are left out.
function(external_symbols object out)
  execute_process(COMMAND ${NM} -C --defined-only ${object}
                  OUTPUT_VARIABLE text RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "multi_arch_objects: ${NM} -C --defined-only ${object} failed (${rc}): ${err}")
  endif()
  # Lines become list items; demangled names hold no ';' and only balanced brackets
  # ([abi:cxx11], operator[]), which CMake's list splitting requires.
  string(REGEX MATCHALL "[^\n]+" lines "${text}")
  set(names "")
  foreach(line IN LISTS lines)
    if(line MATCHES "^[0-9a-fA-F]+ [A-Zuvwi] (.*sparse_attn::.*)$")
      list(APPEND names "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES names)
  set(${out} "${names}" PARENT_SCOPE)
endfunction()

string(TIMESTAMP t0 "%s")
external_symbols(${V2_OBJECT} v2)
external_symbols(${V3_OBJECT} v3)
list(LENGTH v2 n2)
list(LENGTH v3 n3)
# An object that defines none proves nothing (everything inlined, or the library not included).
if(n2 EQUAL 0 OR n3 EQUAL 0)
  message(FATAL_ERROR "multi_arch_objects: no external sparse_attn symbols to compare "
                      "(x86-64-v2: ${n2}, x86-64-v3: ${n3})")
endif()
# Shared names: the union loses one copy of each.
set(all ${v2} ${v3})
list(REMOVE_DUPLICATES all)
list(LENGTH all n_all)
math(EXPR n_shared "${n2} + ${n3} - ${n_all}")
# The ISA tags each object uses, for the log.
foreach(which v2 v3)
  string(REGEX MATCHALL "sparse_attn::[A-Za-z0-9_]+::" tags_${which} "${${which}}")
  list(REMOVE_DUPLICATES tags_${which})
endforeach()
string(TIMESTAMP t1 "%s")
math(EXPR dt "${t1} - ${t0}")
message(STATUS "multi_arch_objects: external sparse_attn symbols: x86-64-v2 ${n2} (${tags_v2}), "
               "x86-64-v3 ${n3} (${tags_v3}), defined in both: ${n_shared} (${dt} s)")
if(n_shared GREATER 0)
  set(shared "")
  foreach(name IN LISTS v2)
    list(FIND v3 "${name}" i)  # not IN_LIST: a -P script runs with the old policies
    if(NOT i EQUAL -1)
      string(APPEND shared "\n  ${name}")
    endif()
  endforeach()
  message(FATAL_ERROR "multi_arch_objects: ${n_shared} symbols of namespace sparse_attn are "
                      "defined by both the x86-64-v2 and the x86-64-v3 object (an ODR violation "
                      "the linker resolves by keeping one copy for both):${shared}")
endif()
message(STATUS "multi_arch_objects: OK")
