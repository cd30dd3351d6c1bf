# cmake -DSOURCE_DIR=... -DWORK_DIR=... [-DEIGEN3_INCLUDE_DIRS=a|b] [-DGXX=...] [-DCLANGXX=...]
#       -P RunStrictConsumer.cmake
# Compiles tests/strict_consumer/consumer.cpp (the umbrella header and every main entry point) the
# way a strict downstream project would: -std=c++17 -Wall -Wextra -Wpedantic -Wshadow
# -Wconversion -Wsign-conversion -Werror, our include/ with -I (not -isystem, which would hide
# our own warnings), Eigen with -isystem. Variants: g++ and clang++-14, each with and without
# -fopenmp, and g++ -fopenmp -fno-exceptions. -O2 as in a release build: GCC's flow-based
# warnings (-Wmaybe-uninitialized, -Warray-bounds, -Wstringop-*) only run when optimizing.
# Every distinct diagnostic (file:line: text, per variant) goes to WORK_DIR/strict_warnings.txt;
# any diagnostic fails the test. A variant whose compiler is not installed is reported, not run.
foreach(v SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "RunStrictConsumer: ${v} not set")
  endif()
endforeach()
if(NOT EIGEN3_INCLUDE_DIRS)
  set(EIGEN3_INCLUDE_DIRS /usr/include/eigen3)
endif()
if(NOT GXX)
  find_program(GXX g++)
endif()
if(NOT CLANGXX)
  find_program(CLANGXX NAMES clang++-14 clang++)
endif()

set(source ${SOURCE_DIR}/tests/strict_consumer/consumer.cpp)
set(common -std=c++17 -O2 -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion
           -Werror -I${SOURCE_DIR}/include)
string(REPLACE "|" ";" eigen_dirs "${EIGEN3_INCLUDE_DIRS}")  # '|': a list through add_test
foreach(dir IN LISTS eigen_dirs)
  list(APPEND common -isystem ${dir})
endforeach()
# One diagnostic per line, and all of them: clang stops after 20 errors by default.
set(gcc_flags -fno-diagnostics-show-caret -fdiagnostics-color=never)
set(clang_flags -fno-caret-diagnostics -fno-color-diagnostics -ferror-limit=0)

# name|compiler variable|the compiler family's diagnostic flags (a variable name),own flags,...
set(variants
    "g++ -fopenmp|GXX|gcc_flags,-fopenmp"
    "g++|GXX|gcc_flags"
    "clang++ -fopenmp|CLANGXX|clang_flags,-fopenmp"
    "clang++|CLANGXX|clang_flags"
    "g++ -fopenmp -fno-exceptions|GXX|gcc_flags,-fopenmp,-fno-exceptions")

# Diagnostics hold ';' and brackets (CMake list syntax); they travel as placeholders until written.
function(escape var)
  string(REPLACE ";" "@SEMI@" s "${${var}}")
  string(REPLACE "[" "@LB@" s "${s}")
  string(REPLACE "]" "@RB@" s "${s}")
  set(${var} "${s}" PARENT_SCOPE)
endfunction()
function(unescape var)
  string(REPLACE "@SEMI@" ";" s "${${var}}")
  string(REPLACE "@LB@" "[" s "${s}")
  string(REPLACE "@RB@" "]" s "${s}")
  set(${var} "${s}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(report "")
set(summary "")
set(failed "")
set(ran 0)
foreach(variant IN LISTS variants)
  string(REPLACE "|" ";" parts "${variant}")
  list(GET parts 0 name)
  list(GET parts 1 compiler_var)
  list(GET parts 2 flag_spec)
  string(REPLACE "," ";" flag_spec "${flag_spec}")
  set(cxx ${${compiler_var}})
  if(NOT cxx)
    string(APPEND report "== ${name}: not run (compiler not installed)\n\n")
    message(STATUS "strict_consumer: ${name}: not run (compiler not installed)")
    continue()
  endif()
  list(GET flag_spec 0 family)
  list(REMOVE_AT flag_spec 0)
  string(MAKE_C_IDENTIFIER "${name}" id)
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${cxx} ${common} ${${family}} ${flag_spec} -c ${source}
                          -o ${WORK_DIR}/${id}.o
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  string(TIMESTAMP t1 "%s")
  math(EXPR dt "${t1} - ${t0}")
  math(EXPR ran "${ran} + 1")

  # file:line:col: warning|error: text [-Werror=flag] (GCC) or [-Werror,-Wflag] (clang); -Werror
  # made every warning an error, so they are written back as warnings with their -W flag.
  escape(out)
  string(REGEX MATCHALL "[^\n]+" lines "${out}")
  set(found "")
  foreach(line IN LISTS lines)
    if(line MATCHES "^(.+):([0-9]+):[0-9]+: (warning|error): (.*)$")
      set(file "${CMAKE_MATCH_1}")
      set(ln "${CMAKE_MATCH_2}")
      set(kind "${CMAKE_MATCH_3}")
      set(text "${CMAKE_MATCH_4}")
      if(text MATCHES "@LB@-Werror=([^@]+)@RB@$")
        string(REGEX REPLACE "@LB@-Werror=([^@]+)@RB@$" "@LB@-W\\1@RB@" text "${text}")
        set(kind warning)
      elseif(text MATCHES "@LB@-Werror,(-W[^@]+)@RB@$")
        string(REGEX REPLACE "@LB@-Werror,(-W[^@]+)@RB@$" "@LB@\\1@RB@" text "${text}")
        set(kind warning)
      endif()
      string(FIND "${file}" "${SOURCE_DIR}/" at)
      if(at EQUAL 0)
        file(RELATIVE_PATH file ${SOURCE_DIR} ${file})
      endif()
      list(APPEND found "${file}:${ln}: ${kind}: ${text}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES found)
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.18)
    list(SORT found COMPARE NATURAL)
  else()
    list(SORT found)
  endif()
  list(LENGTH found n)
  if(NOT rc EQUAL 0 AND n EQUAL 0)
    # Failed without a diagnostic we could parse (a missing header, a crash): keep its output.
    unescape(out)
    string(APPEND report "== ${name}: failed (${rc}) without a file:line diagnostic:\n${out}\n")
    list(APPEND failed "${name}")
    message(STATUS "strict_consumer: ${name}: failed (${rc}) (${dt} s)")
    continue()
  endif()

  # Per-header counts, for the summary.
  set(files "")
  foreach(entry IN LISTS found)
    string(REGEX REPLACE ":[0-9]+: .*$" "" f "${entry}")
    list(APPEND files "${f}")
  endforeach()
  set(per_file "")
  set(unique_files ${files})
  list(REMOVE_DUPLICATES unique_files)
  foreach(f IN LISTS unique_files)
    set(c 0)
    foreach(g IN LISTS files)
      if(g STREQUAL f)
        math(EXPR c "${c} + 1")
      endif()
    endforeach()
    string(APPEND per_file "    ${c} ${f}\n")
  endforeach()

  string(APPEND report "== ${name}: ${n} distinct diagnostics (exit ${rc}, ${dt} s)\n")
  foreach(entry IN LISTS found)
    string(APPEND report "${entry}\n")
  endforeach()
  string(APPEND report "\n")
  string(APPEND summary "  ${name}: ${n}\n${per_file}")
  if(n GREATER 0 OR NOT rc EQUAL 0)
    list(APPEND failed "${name}")
  endif()
  message(STATUS "strict_consumer: ${name}: ${n} distinct diagnostics (${dt} s)")
endforeach()

unescape(report)
unescape(summary)
set(flags_line "${common}")
string(REPLACE ";" " " flags_line "${flags_line}")
file(WRITE ${WORK_DIR}/strict_warnings.txt
     "Strict consumer build of tests/strict_consumer/consumer.cpp (cmake/RunStrictConsumer.cmake)\n"
     "Flags: ${flags_line}\n"
     "g++: ${GXX}\nclang++: ${CLANGXX}\n\n"
     "Summary (distinct diagnostics per variant, then per file):\n${summary}\n${report}")
if(ran EQUAL 0)
  message(FATAL_ERROR "strict_consumer: neither g++ nor clang++ found")
endif()
if(failed)
  message(FATAL_ERROR "strict_consumer: diagnostics in: ${failed}\n"
                      "Summary (distinct diagnostics per variant, then per file):\n${summary}"
                      "Full list: ${WORK_DIR}/strict_warnings.txt")
endif()
message(STATUS "strict_consumer: OK")
