// Test helpers for the GUI models: a text dump of a model (every row, column and the given
// roles), so that a model fed a whole sequence of snapshots can be compared with one fed only
// the last; Watched puts a model under QAbstractItemModelTester and counts its signals.
#pragma once

#include <QAbstractItemModel>
#include <QAbstractItemModelTester>
#include <QSignalSpy>
#include <QString>
#include <QStringList>

namespace dst::test {

inline void DumpRows(const QAbstractItemModel& m, const QModelIndex& parent, int depth,
                     const QList<int>& roles, QStringList* out) {
  for (int r = 0; r < m.rowCount(parent); ++r) {
    QStringList cells;
    for (int c = 0; c < m.columnCount(parent); ++c)
      cells << m.index(r, c, parent).data().toString();
    QModelIndex i = m.index(r, 0, parent);
    for (int role : roles) cells << i.data(role).toString();
    *out << QString(depth * 2, QChar(' ')) + cells.join(QStringLiteral(" | "));
    DumpRows(m, i, depth + 1, roles, out);
  }
}

inline QString Dump(const QAbstractItemModel& m, const QList<int>& roles) {
  QStringList out;
  DumpRows(m, {}, 0, roles, &out);
  return out.join(QChar('\n'));
}

// A model under QAbstractItemModelTester, with the signals the tests count.
struct Watched {
  explicit Watched(QAbstractItemModel* m)
      : tester(m, QAbstractItemModelTester::FailureReportingMode::QtTest),
        resets(m, &QAbstractItemModel::modelReset),
        inserted(m, &QAbstractItemModel::rowsInserted),
        removed(m, &QAbstractItemModel::rowsRemoved),
        changed(m, &QAbstractItemModel::dataChanged) {}
  QAbstractItemModelTester tester;
  QSignalSpy resets, inserted, removed, changed;
};

}  // namespace dst::test
