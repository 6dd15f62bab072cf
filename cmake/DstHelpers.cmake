# dst_add_test(NAME <name> SOURCES <files...> LIBS <targets...> LABELS <labels...> [TIMEOUT <s>])
# Builds a Qt Test executable and registers it with CTest. Exit code 77 means SKIP (only outside CI:
# under CI=true tests must fail instead of skipping, see tests/lib/test_env.h).
function(dst_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE Qt6::Test dst_testlib ${T_LIBS})
  add_test(NAME ${T_NAME} COMMAND ${T_NAME})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  # tests_<label> targets (tests/CMakeLists.txt) build only one label's executables.
  foreach(l IN LISTS T_LABELS)
    set_property(GLOBAL APPEND PROPERTY DST_TESTS_${l} ${T_NAME})
  endforeach()
  # Qt Test's own watchdog (QTEST_FUNCTION_TIMEOUT, default 300 s per test function) must not
  # fire before CTest's: a long test function (fault_campaign_test) gets the test's budget.
  math(EXPR qt_timeout_ms "(${T_TIMEOUT} - 5) * 1000")
  set_tests_properties(${T_NAME} PROPERTIES
    LABELS "${T_LABELS}"
    TIMEOUT ${T_TIMEOUT}
    SKIP_RETURN_CODE 77
    ENVIRONMENT "DST_BUILD_DIR=${CMAKE_BINARY_DIR};DST_SOURCE_DIR=${CMAKE_SOURCE_DIR};QT_QPA_PLATFORM=offscreen;QTEST_FUNCTION_TIMEOUT=${qt_timeout_ms}")
endfunction()
