// A volume imported over NBD (issue 10 item 2): dstd A exports two files (DST, and NBD on its own
// port); dstd B imports them as volumes by nbd:// URI, one from its config file ([[volume]]
// remote = "nbd://...") and one with `dstctl volume import`, and exports both over DST.  A DST
// client reads and writes through B; the bytes are A's files.  Both volumes are NbdClientDevices
// (the reconnecting client core), parsed by the one URI parser (net/uri.h).
#include <QFile>
#include <QJsonArray>
#include <QJsonDocument>
#include <QJsonObject>
#include <QTemporaryDir>
#include <QTest>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include "daemon_process.h"
#include "dst/net/remote_device.h"
#include "test_env.h"

using namespace dst;
using dst::test::DaemonProcess;

namespace {

constexpr qint64 kSize = 8 << 20;

QByteArray Pattern(qint64 n, quint32 seed) {
  QByteArray b(n, 0);
  quint32 x = seed * 2654435761u + 1;
  for (qint64 i = 0; i < n; ++i) {
    x = x * 1103515245u + 12345u;
    b[i] = char(x >> 24);
  }
  return b;
}

QByteArray FileBytes(const QString& path, qint64 off, qint64 n) {
  QFile f(path);
  if (!f.open(QIODevice::ReadOnly) || !f.seek(off)) return {};
  return f.read(n);
}

// `dstctl volume list --json`: the entry named `name` (empty object if absent).
QJsonObject VolumeEntry(DaemonProcess& d, const QString& name) {
  QByteArray out;
  if (d.Ctl({"volume", "list", "--json"}, &out) != 0) return {};
  for (const QJsonValue& v : QJsonDocument::fromJson(out).object()["volumes"].toArray())
    if (v.toObject()["name"].toString() == name) return v.toObject();
  return {};
}

// The DST client's event loop, stopped and joined on every way out of a test.
class ClientLoop {
 public:
  ClientLoop() : work_(io_.get_executor()), thread_([this] { io_.run(); }) {}
  ~ClientLoop() {
    work_.reset();
    io_.stop();
    thread_.join();
  }
  boost::asio::io_context& io() { return io_; }

 private:
  boost::asio::io_context io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
};

}  // namespace

class NbdVolumeTest : public QObject {
  Q_OBJECT
 private slots:
  void volumesImportedByNbdUri() {
    QTemporaryDir dir;
    const QString img1 = dir.path() + "/disk1.img", img2 = dir.path() + "/disk2.img";
    for (const auto& [path, seed] : {std::pair{img1, 1u}, std::pair{img2, 2u}}) {
      QFile f(path);
      QVERIFY(f.open(QIODevice::WriteOnly | QIODevice::Truncate));
      QCOMPARE(f.write(Pattern(kSize, seed)), kSize);
    }
    DaemonProcess a(dir.path() + "/a");
    a.config() = QString("[[export]]\nname = \"disk1\"\npath = \"%1\"\n"
                         "[[export]]\nname = \"disk2\"\npath = \"%2\"\n").arg(img1, img2);
    QVERIFY2(a.Start(), a.Log().constData());
    const QString nbd1 = QString("nbd://127.0.0.1:%1/disk1").arg(a.nbd_port());
    const QString nbd2 = QString("nbd://127.0.0.1:%1/disk2").arg(a.nbd_port());

    DaemonProcess b(dir.path() + "/b");
    b.config() = QString("[[volume]]\nname = \"cfgvol\"\nremote = \"%1\"\nio_timeout = 10\n"
                         "[[export]]\nname = \"viacfg\"\nvolume = \"cfgvol\"\n").arg(nbd1);
    QVERIFY2(b.Start(), b.Log().constData());
    QTRY_COMPARE_WITH_TIMEOUT(VolumeEntry(b, "cfgvol")["state"].toString(), QString("connected"), 15000);
    QCOMPARE(qint64(VolumeEntry(b, "cfgvol")["size"].toDouble()), kSize);

    QByteArray out, err;
    QCOMPARE(b.Ctl({"volume", "import", "ctlvol", nbd2, "--timeout", "10"}, &out, &err), 0);
    QTRY_COMPARE_WITH_TIMEOUT(VolumeEntry(b, "ctlvol")["state"].toString(), QString("connected"), 15000);
    QCOMPARE(b.Ctl({"export", "add", "viactl", "--volume", "ctlvol"}, &out, &err), 0);
    // The same NBD export a second time read-write: refused (one writer per remote).
    QVERIFY(b.Ctl({"volume", "import", "again", nbd1}, &out, &err) != 0);
    QVERIFY2(err.contains("already"), err.constData());
    // The URI parser's errors reach the user.
    QVERIFY(b.Ctl({"volume", "import", "badport", "nbd://127.0.0.1:0/disk1"}, &out, &err) != 0);
    QVERIFY2(err.contains("bad port"), err.constData());
    QVERIFY(b.Ctl({"volume", "import", "nohost", "nbd:///disk1"}, &out, &err) != 0);
    QVERIFY2(err.contains("empty host"), err.constData());

    // Read and write through B (DST) -> NBD client volume -> A's NBD server -> A's file.
    ClientLoop loop;
    for (const auto& [name, img, seed] : {std::tuple{"viacfg", img1, 1u}, std::tuple{"viactl", img2, 2u}}) {
      net::RemoteOptions ro;
      ro.port = b.port();
      ro.export_name = name;
      auto r = net::RemoteDevice::Connect(loop.io(), ro);
      QVERIFY2(r.ok(), r.status().ToString().c_str());
      auto dev = r.value();
      QCOMPARE(qint64(dev->Info().size), kSize);
      std::vector<char> buf(1 << 20);
      QVERIFY(ReadSync(*dev, 3 << 20, buf.data(), 1 << 20).ok());
      QVERIFY2(QByteArray(buf.data(), 1 << 20) == Pattern(kSize, seed).mid(3 << 20, 1 << 20), name);
      const QByteArray w = Pattern(256 << 10, 77 + seed);
      QVERIFY(WriteSync(*dev, 5 << 20, w.constData(), 256 << 10).ok());
      QVERIFY(FlushSync(*dev).ok());
      QCOMPARE(FileBytes(img, 5 << 20, 256 << 10), w);
      QVERIFY(ReadSync(*dev, 5 << 20, buf.data(), 256 << 10).ok());
      QCOMPARE(QByteArray(buf.data(), 256 << 10), w);
      dev->Close();
    }
    QCOMPARE(b.Terminate(), 0);
    QCOMPARE(a.Terminate(), 0);
  }
};

DST_TEST_MAIN(NbdVolumeTest)
#include "nbd_volume_test.moc"
