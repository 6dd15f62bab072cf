// dst-gui's desktop integration: resources/dst-gui.desktop passes desktop-file-validate (a
// missing validator skips, but fails under CI=true), names the executable and the icon, the
// icon is an SVG document; `cmake --install --component gui` puts the executable, desktop
// file, icon and gzipped man page where desktop environments and man look; and the main
// window remembers its geometry, splitter state and tab in QSettings.
#include <QtTest/QtTest>

#include <QApplication>
#include <QSettings>
#include <QSplitter>
#include <QTabWidget>
#include <QTemporaryDir>
#include <QXmlStreamReader>

#include "main_window.h"
#include "run_tool.h"
#include "test_env.h"

using dst::gui::MainWindow;
using dst::test::RunTool;

namespace {

QString Source(const char* rel) { return qEnvironmentVariable("DST_SOURCE_DIR") + "/" + rel; }

// The value of `key` in the [Desktop Entry] group.
QString Entry(const QString& path, const QString& key) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly)) return {};
  for (const QString& line : QString::fromUtf8(f.readAll()).split('\n'))
    if (line.startsWith(key + '=')) return line.mid(key.size() + 1);
  return {};
}

void Validate(const QString& path) {
  const auto r = RunTool("desktop-file-validate", {path});
  QVERIFY2(r.rc == 0, (r.out + r.err).constData());
  QVERIFY2((r.out + r.err).trimmed().isEmpty(), (r.out + r.err).constData());  // no warnings either
}

}  // namespace

class DesktopIntegrationTest : public QObject {
  Q_OBJECT
 private slots:
  void desktopFileValid() {
    DST_REQUIRE(dst::test::HaveTool("desktop-file-validate"),
                "needs desktop-file-validate (package desktop-file-utils)");
    const QString desktop = Source("resources/dst-gui.desktop");
    Validate(desktop);
    QCOMPARE(Entry(desktop, "Exec"), QStringLiteral("dst-gui"));
    QCOMPARE(Entry(desktop, "Icon"), QStringLiteral("dst-gui"));
    QCOMPARE(Entry(desktop, "Type"), QStringLiteral("Application"));
  }

  void iconIsSvg() {
    QFile f(Source("resources/dst-gui.svg"));
    QVERIFY(f.open(QIODevice::ReadOnly));
    QXmlStreamReader x(&f);
    QVERIFY(x.readNextStartElement());
    QCOMPARE(x.name().toString(), QStringLiteral("svg"));
    QCOMPARE(x.attributes().value("viewBox").toString(), QStringLiteral("0 0 128 128"));
    while (!x.atEnd()) x.readNext();
    QVERIFY2(!x.hasError(), qPrintable(x.errorString()));
  }

  void installRules() {
    DST_REQUIRE(dst::test::HaveTool("cmake"), "needs cmake");
    QTemporaryDir prefix;
    const auto r = RunTool("cmake", {"--install", qEnvironmentVariable("DST_BUILD_DIR"), "--component", "gui",
                                     "--prefix", prefix.path()}, 120000);
    QVERIFY2(r.rc == 0, (r.out + r.err).constData());
    for (const char* f : {"bin/dst-gui", "share/applications/dst-gui.desktop",
                          "share/icons/hicolor/scalable/apps/dst-gui.svg", "share/man/man1/dst-gui.1.gz"})
      QVERIFY2(QFile::exists(prefix.path() + "/" + f), f);
    QVERIFY(QFileInfo(prefix.path() + "/bin/dst-gui").isExecutable());
    // The man page is the source's, gzipped.
    const auto z = RunTool("gzip", {"-dc", prefix.path() + "/share/man/man1/dst-gui.1.gz"});
    QFile man(Source("docs/man/dst-gui.1"));
    QVERIFY(man.open(QIODevice::ReadOnly));
    QCOMPARE(z.out, man.readAll());
    if (dst::test::HaveTool("desktop-file-validate")) Validate(prefix.path() + "/share/applications/dst-gui.desktop");
  }

  void windowRemembersLayout() {
    QTemporaryDir config;
    QSettings::setPath(QSettings::NativeFormat, QSettings::UserScope, config.path());
    const QStringList hosts = {config.path() + "/nobody.sock"};
    QList<int> top, main;
    {
      MainWindow w(hosts);
      w.show();
      QVERIFY(QTest::qWaitForWindowExposed(&w));
      w.resize(1111, 777);
      w.topSplitter()->setSizes({200, 800});
      w.mainSplitter()->setSizes({500, 200});
      w.tabs()->setCurrentIndex(1);
      QTRY_COMPARE(w.size(), QSize(1111, 777));
      top = w.topSplitter()->sizes();
      main = w.mainSplitter()->sizes();
      QVERIFY(w.close());  // saves
    }
    QVERIFY(QFile::exists(config.path() + "/dst/dst-gui.conf"));
    MainWindow again(hosts);
    again.show();
    QVERIFY(QTest::qWaitForWindowExposed(&again));
    QTRY_COMPARE(again.size(), QSize(1111, 777));
    QCOMPARE(again.topSplitter()->sizes(), top);
    QCOMPARE(again.mainSplitter()->sizes(), main);
    QCOMPARE(again.tabs()->currentIndex(), 1);
    QVERIFY(top != QList<int>({0, 0}));
  }
};

int main(int argc, char** argv) {
  QApplication app(argc, argv);
  DesktopIntegrationTest tc;
  int rc = QTest::qExec(&tc, argc, argv);
  return rc == 0 && dst::test::SkippedFlag() ? 77 : rc;
}
#include "desktop_integration_test.moc"
