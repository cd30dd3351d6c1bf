# run_step(<name> <command...>): runs one step of a nested-build test script, times it, and stops
# the script with "<RUN_STEP_JOB>: step '<name>' failed (<rc>) after <s> s" when it fails.
# The including script sets RUN_STEP_JOB to its ctest name.
function(run_step name)
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  string(TIMESTAMP t1 "%s")
  math(EXPR dt "${t1} - ${t0}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${RUN_STEP_JOB}: step '${name}' failed (${rc}) after ${dt} s")
  endif()
  message(STATUS "${RUN_STEP_JOB}: ${name} ok (${dt} s)")
endfunction()
