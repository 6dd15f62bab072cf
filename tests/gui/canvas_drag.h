// A QTest mouse drag on a TopologyCanvas: press on a node, move half way, move, release at a
// viewport point (what a user's drag and drop delivers to the canvas).
#pragma once

#include <QtTest/QtTest>

#include "topology_canvas.h"

namespace dst::test {

// Press on `from`'s node, move, release at viewport point `to`.
inline void Drag(gui::TopologyCanvas* c, const QString& from, QPoint to) {
  QPoint p = c->mapFromScene(c->nodeRect(from).center());
  QVERIFY2(c->viewport()->rect().contains(p) && c->viewport()->rect().contains(to), qPrintable(from));
  QTest::mousePress(c->viewport(), Qt::LeftButton, {}, p);
  QTest::mouseMove(c->viewport(), (p + to) / 2);
  QTest::mouseMove(c->viewport(), to);
  QTest::mouseRelease(c->viewport(), Qt::LeftButton, {}, to);
}

// A node's centre in viewport coordinates.
inline QPoint Center(gui::TopologyCanvas* c, const QString& key) { return c->mapFromScene(c->nodeRect(key).center()); }

}  // namespace dst::test
