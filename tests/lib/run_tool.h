// RunTool: runs a program to completion and returns its exit code and output (-1 if it did not
// start, crashed or timed out).
#pragma once

#include <QByteArray>
#include <QProcess>
#include <QString>
#include <QStringList>

namespace dst::test {

struct ToolResult {
  int rc = -1;
  QByteArray out, err;
};

inline ToolResult RunTool(const QString& prog, const QStringList& args, int timeout_ms = 30000) {
  ToolResult r;
  QProcess p;
  p.start(prog, args);
  if (!p.waitForStarted(10000) || !p.waitForFinished(timeout_ms)) {
    p.kill();
    p.waitForFinished(5000);
    r.err = "failed to start or timed out: " + prog.toUtf8() + " " + args.join(' ').toUtf8();
    return r;
  }
  r.out = p.readAllStandardOutput();
  r.err = p.readAllStandardError();
  r.rc = p.exitStatus() == QProcess::NormalExit ? p.exitCode() : -1;
  return r;
}

}  // namespace dst::test
