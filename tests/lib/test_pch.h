// The headers that the unit and integration tests share, precompiled once per test directory
// (cmake/DstHelpers.cmake, DST_PCH).  Qt Test's module header pulls in all of QtCore, which is
// most of a test's compile time; the tests still include what they use themselves.
#pragma once

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>

#include <QtTest/QtTest>
