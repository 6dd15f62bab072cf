# dst_add_test(NAME <name> SOURCES <files...> LIBS <targets...> LABELS <labels...> [TIMEOUT <s>])
# Builds a Qt Test executable and registers it with CTest. Exit code 77 means SKIP (only outside CI:
# under CI=true tests must fail instead of skipping, see tests/lib/test_env.h).
function(dst_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE Qt6::Test dst_testlib ${T_LIBS})
  dst_test_pch(${T_NAME})
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

# DST_PCH (GCC builds): the tests of one directory reuse one precompiled tests/lib/test_pch.h.
# A clean build on two cores went from 1,070 s to 980 s (the test sources' compile time from
# 1,128 to 919 CPU seconds); the CI run has a 45-minute budget.  GCC only uses a precompiled
# header whose macros match the compile line, so the tests of a directory share their
# definitions (dst_testlib adds the Boost ones to every test, and QT_TESTCASE_BUILDDIR differs
# per directory); a mismatch falls back to the header's text with a -Winvalid-pch warning, so
# it costs time, never correctness.  tests/gui is left out: its tests link different Qt modules
# (QT_GUI_LIB, QT_WIDGETS_LIB, QT_NETWORK_LIB change what Qt Test's header includes).  Off for
# clang (a mismatch is an error there) and under ccache (it does not cache PCH users unless told
# to be sloppy).
function(dst_test_pch target)
  if(NOT DST_PCH)
    return()
  endif()
  get_filename_component(dir "${CMAKE_CURRENT_SOURCE_DIR}" NAME)
  if(NOT dir MATCHES "^(unit|integration)$")
    return()
  endif()
  set(pch dst_pch_${dir})
  if(NOT TARGET ${pch})
    add_library(${pch} OBJECT ${CMAKE_SOURCE_DIR}/tests/lib/test_pch.cc)
    target_link_libraries(${pch} PRIVATE Qt6::Test dst_testlib)
    target_precompile_headers(${pch} PRIVATE ${CMAKE_SOURCE_DIR}/tests/lib/test_pch.h)
  endif()
  target_precompile_headers(${target} REUSE_FROM ${pch})
  # AUTOMOC's mocs_compilation.cpp is nearly empty: loading the 268 MB precompiled header would cost it
  # 2-3 s instead of saving anything.
  set_source_files_properties(${CMAKE_CURRENT_BINARY_DIR}/${target}_autogen/mocs_compilation.cpp
                              TARGET_DIRECTORY ${target} PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
endfunction()
