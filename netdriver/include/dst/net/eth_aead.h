// AEAD for DST-Eth frames (docs/protocol.md §12.6): keys from a pre-shared key and the two
// identities (HKDF-SHA256), AES-256-GCM over every frame with the sender's packet counter as
// the nonce, and a replay window on the receiving side.
//
//   sender:   EncodeEthFrame(h, ...) -> EthSealer::Seal(frame)   packet := next, flag AEAD,
//                                                                 payload encrypted, tag set
//   receiver: EthOpener::Open(frame)  -> DecodeEthFrame(...)     tag checked, replay checked,
//                                                                 payload decrypted in place
//
// Both work in place on caller-owned frames, with one cipher context made at construction:
// no allocation per frame (eth_aead_test counts).  A key encrypts one direction of one
// session only, so (key, nonce) never repeats as long as the packet counter does not, and the
// sealer refuses to wrap it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "dst/status.h"

namespace dst::net {

inline constexpr std::size_t kEthKeySize = 32;  // AES-256
using EthKey = std::array<std::uint8_t, kEthKeySize>;

// The two directions of a session.  The initiator sends with initiator_to_responder.
struct EthSessionKeys {
  EthKey initiator_to_responder{};
  EthKey responder_to_initiator{};
};

// HKDF-SHA256 (RFC 5869): IKM = the pre-shared key, salt = "dst-eth-v1" || session (8 bytes,
// big-endian), info = "dst-eth-v1 i2r|r2i" || 0 || initiator identity || 0 || responder
// identity.  A PSK shorter than 16 bytes is refused.  Same inputs, same keys on both hosts.
Result<EthSessionKeys> DeriveEthKeys(std::span<const std::uint8_t> psk, std::string_view initiator,
                                     std::string_view responder, std::uint64_t session);

// Accepts each packet number at most once, and none more than about kSpan behind the newest
// seen (RFC 4303's anti-replay window; a bitmap of kSpan / 64 words, so between kSpan - 63 and
// kSpan packets back).  A duplicated or replayed frame is dropped and counted.
class EthReplayWindow {
 public:
  static constexpr std::uint64_t kSpan = 1024;
  // True when `packet` is new and within the window (does not record it).
  bool Fresh(std::uint64_t packet) const;
  // Records `packet` as seen; call only after its tag verified.
  void Accept(std::uint64_t packet);
  std::uint64_t newest() const { return newest_; }

 private:
  bool Seen(std::uint64_t packet) const { return (bits_[(packet / 64) % kWords] >> (packet % 64)) & 1; }
  static constexpr std::size_t kWords = kSpan / 64;
  std::uint64_t newest_ = 0;  // 0: nothing seen (packet numbers start at 1)
  std::array<std::uint64_t, kWords> bits_{};
};

struct EthAeadCounters {
  std::uint64_t sealed = 0;
  std::uint64_t opened = 0;
  std::uint64_t bad_tag = 0;     // authentication failed: wrong key, or changed on the way
  std::uint64_t replayed = 0;    // a packet number seen before, or older than the window
  std::uint64_t malformed = 0;   // too short, or the AEAD flag not set
};

class EthAeadCipher;  // the OpenSSL context (eth_aead.cc)

// One direction's sender.  Seal() overwrites the frame's packet field with the next number
// (starting at 1), so a frame re-sent is a new packet with a new nonce.
class EthSealer {
 public:
  explicit EthSealer(const EthKey& key);
  ~EthSealer();
  EthSealer(const EthSealer&) = delete;
  EthSealer& operator=(const EthSealer&) = delete;
  // `frame` is a whole frame from the destination MAC on (EncodeEthFrame's output, AEAD flag
  // clear, tag zero).  False when the frame is malformed or the counter is used up (never
  // wraps: the session must be re-keyed), and then the frame is unchanged.
  bool Seal(std::uint8_t* frame, std::size_t len);
  std::uint64_t next_packet() const { return next_; }
  const EthAeadCounters& counters() const { return counters_; }
  // Tests only: start the counter elsewhere (to reach the end of it).
  void SetNextPacketForTest(std::uint64_t p) { next_ = p; }

 private:
  std::unique_ptr<EthAeadCipher> cipher_;
  std::uint64_t next_ = 1;
  EthAeadCounters counters_;
};

// One direction's receiver: checks the replay window, verifies the tag and decrypts the
// payload in place.  A frame that fails is counted and must be dropped (its headers are as
// they were, its payload bytes are not meaningful); nothing is answered.
class EthOpener {
 public:
  explicit EthOpener(const EthKey& key);
  ~EthOpener();
  EthOpener(const EthOpener&) = delete;
  EthOpener& operator=(const EthOpener&) = delete;
  bool Open(std::uint8_t* frame, std::size_t len);
  const EthAeadCounters& counters() const { return counters_; }

 private:
  std::unique_ptr<EthAeadCipher> cipher_;
  EthReplayWindow window_;
  EthAeadCounters counters_;
};

}  // namespace dst::net
