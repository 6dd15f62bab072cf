// SortedMerge: brings a list of rows sorted by key in line with a new list sorted the same way,
// one row at a time, so a model can wrap each step in beginRemoveRows/beginInsertRows and
// report a kept row with dataChanged instead of resetting (both models diff snapshots with it).
#pragma once

#include <cstddef>

namespace dst::gui {

// `size()` is the current row count (it changes as rows are removed and inserted);
// `key_at(i)` the key of current row i; `want_size` / `want_key(j)` the wanted rows.
// remove(i): drop current row i.  insert(i, j): put wanted row j at current row i.
// keep(i, j): current row i is wanted row j (update it).
template <typename Size, typename KeyAt, typename WantKey, typename Remove, typename Insert,
          typename Keep>
void SortedMerge(Size size, KeyAt key_at, std::size_t want_size, WantKey want_key, Remove remove,
                 Insert insert, Keep keep) {
  std::size_t i = 0, j = 0;
  while (i < std::size_t(size()) || j < want_size) {
    if (j == want_size || (i < std::size_t(size()) && key_at(i) < want_key(j))) {
      remove(i);
    } else if (i == std::size_t(size()) || want_key(j) < key_at(i)) {
      insert(i, j);
      ++i, ++j;
    } else {
      keep(i, j);
      ++i, ++j;
    }
  }
}

}  // namespace dst::gui
