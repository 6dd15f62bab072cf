// dst-gui: see gui/README.md.  `dst-gui [--host SOCKET]...`
#include <QApplication>

#include "main_window.h"

int main(int argc, char** argv) {
  QApplication app(argc, argv);
  QApplication::setApplicationName("dst-gui");
  QApplication::setApplicationVersion(QStringLiteral(DST_VERSION));
  dst::gui::MainWindow w(dst::gui::HostsFromArgs(app.arguments(), qEnvironmentVariable("DST_SOCKET")));
  w.show();
  return app.exec();
}
