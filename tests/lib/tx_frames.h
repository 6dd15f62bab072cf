// Frames: n test frames (a DST READ reply header with id i, then `payload_len` patterned bytes)
// for the Transmitter and Transport tests, recording the order and result of on_sent.
#pragma once

#include <cstdint>
#include <vector>

#include "dst/net/codec.h"
#include "dst/net/transport.h"

namespace dst::net {

struct Frames {
  std::vector<TxFrame> f;
  std::vector<char> payload;
  std::vector<int> sent_order;
  std::vector<bool> sent_ok;
  std::vector<const char*> sent_payload;
  std::uint32_t len;

  Frames(int n, std::uint32_t payload_len) : f(n), payload(std::size_t(n) * payload_len), len(payload_len) {
    for (std::size_t i = 0; i < payload.size(); ++i) payload[i] = char((i * 7 + i / 4096) & 0xff);
    for (int i = 0; i < n; ++i) {
      Header h;
      h.cmd = std::uint16_t(Cmd::kRead) | kReplyBit;
      h.id = std::uint64_t(i);
      h.length = payload_len;
      EncodeHeader(h, f[i].header);
      f[i].payload = payload_len ? payload.data() + std::size_t(i) * payload_len : nullptr;
      f[i].payload_len = payload_len;
      f[i].owner = this;
      f[i].on_sent = [](TxFrame* fr, bool ok) {
        auto* self = static_cast<Frames*>(fr->owner);
        self->sent_order.push_back(int(fr - self->f.data()));
        self->sent_ok.push_back(ok);
        self->sent_payload.push_back(fr->payload);
      };
    }
  }
  // Links the frames through TxFrame::next (a frame list for Transport::SendFrames).
  void Chain() {
    for (std::size_t i = 0; i + 1 < f.size(); ++i) f[i].next = &f[i + 1];
  }
  std::size_t FrameBytes() const { return kHeaderSize + len; }
  std::size_t WireBytes() const { return f.size() * (kHeaderSize + len); }
  // The byte stream the receiver must see.
  std::vector<char> Expected() const {
    std::vector<char> out;
    for (std::size_t i = 0; i < f.size(); ++i) {
      out.insert(out.end(), f[i].header, f[i].header + kHeaderSize);
      out.insert(out.end(), payload.begin() + i * len, payload.begin() + (i + 1) * len);
    }
    return out;
  }
};

}  // namespace dst::net
