#include "dst/net/eth_aead.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include <cstring>
#include <string>

#include "dst/net/eth_format.h"

namespace dst::net {

namespace {

// Offsets of the fields the AEAD touches (docs/protocol.md §12.2), from the frame's start.
constexpr std::size_t kFlagsAt = kEthHeaderSize + 4;
constexpr std::size_t kPacketAt = kEthHeaderSize + 16;
constexpr std::size_t kPayloadLenAt = kEthHeaderSize + 44;
constexpr std::size_t kTagAt = kEthHeaderSize + kEthTagOffset;
constexpr std::size_t kNonceSize = 12;

std::uint16_t GetU16(const std::uint8_t* p) { return std::uint16_t((p[0] << 8) | p[1]); }
void PutU16(std::uint8_t* p, std::uint16_t v) {
  p[0] = std::uint8_t(v >> 8);
  p[1] = std::uint8_t(v);
}
std::uint64_t GetU64(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}
void PutU64(std::uint8_t* p, std::uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = std::uint8_t(v);
}

// A frame the AEAD can work on: the headers and exactly payload_len bytes after them.
bool Shaped(const std::uint8_t* f, std::size_t len) {
  return len >= kEthOverhead && len == kEthOverhead + GetU16(f + kPayloadLenAt);
}

// The nonce: 4 zero bytes, then the 8-byte packet number.  Unique per key because a key
// serves one direction of one session and the packet number never repeats in it.
void Nonce(const std::uint8_t* frame, std::uint8_t out[kNonceSize]) {
  std::memset(out, 0, 4);
  std::memcpy(out + 4, frame + kPacketAt, 8);
}

// The additional data: both headers with the tag field zeroed (78 bytes on the stack).
void Aad(const std::uint8_t* frame, std::uint8_t out[kEthOverhead]) {
  std::memcpy(out, frame, kEthOverhead);
  std::memset(out + kTagAt, 0, kEthTagSize);
}

}  // namespace

// One AES-256-GCM context, keyed once; each frame only sets its IV.
class EthAeadCipher {
 public:
  EthAeadCipher(const EthKey& key, bool encrypt) : ctx_(EVP_CIPHER_CTX_new()), encrypt_(encrypt) {
    cipher_ = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    ok_ = ctx_ && cipher_ && EVP_CipherInit_ex2(ctx_, cipher_, key.data(), nullptr, encrypt ? 1 : 0, nullptr) == 1;
  }
  ~EthAeadCipher() {
    EVP_CIPHER_CTX_free(ctx_);
    EVP_CIPHER_free(cipher_);
  }
  // Encrypts or decrypts payload[0..n) in place with `nonce` and `aad`; the tag is written
  // (encrypt) or checked (decrypt).  False on any failure, including a wrong tag.
  bool Run(const std::uint8_t* nonce, const std::uint8_t* aad, std::size_t aad_len, std::uint8_t* payload,
           std::size_t n, std::uint8_t* tag) {
    if (!ok_) return false;
    int out = 0;
    if (EVP_CipherInit_ex2(ctx_, nullptr, nullptr, nonce, encrypt_ ? 1 : 0, nullptr) != 1) return false;
    if (EVP_CipherUpdate(ctx_, nullptr, &out, aad, int(aad_len)) != 1) return false;
    if (n > 0 && EVP_CipherUpdate(ctx_, payload, &out, payload, int(n)) != 1) return false;
    if (!encrypt_ && EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_SET_TAG, int(kEthTagSize), tag) != 1) return false;
    std::uint8_t scratch[16];
    if (EVP_CipherFinal_ex(ctx_, scratch, &out) != 1) return false;  // decrypt: the tag check
    if (encrypt_ && EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_GET_TAG, int(kEthTagSize), tag) != 1) return false;
    return true;
  }

 private:
  EVP_CIPHER_CTX* ctx_;
  EVP_CIPHER* cipher_ = nullptr;
  bool encrypt_;
  bool ok_ = false;
};

Result<EthSessionKeys> DeriveEthKeys(std::span<const std::uint8_t> psk, std::string_view initiator,
                                     std::string_view responder, std::uint64_t session) {
  if (psk.size() < 16) return Status::InvalidArgument("eth: the pre-shared key must be at least 16 bytes");
  if (session == 0) return Status::InvalidArgument("eth: session 0 is not a session");
  std::uint8_t salt[10 + 8];
  std::memcpy(salt, "dst-eth-v1", 10);
  PutU64(salt + 10, session);
  EthSessionKeys keys;
  for (int dir = 0; dir < 2; ++dir) {
    std::string info = dir == 0 ? "dst-eth-v1 i2r" : "dst-eth-v1 r2i";
    info.push_back('\0');
    info.append(initiator);
    info.push_back('\0');
    info.append(responder);
    EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
    EVP_KDF_CTX* kctx = kdf ? EVP_KDF_CTX_new(kdf) : nullptr;
    EVP_KDF_free(kdf);
    if (!kctx) return Status::IoError("eth: HKDF is not available in this OpenSSL");
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, const_cast<char*>("SHA256"), 0),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<std::uint8_t*>(psk.data()), psk.size()),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, salt, sizeof salt),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info.data(), info.size()),
        OSSL_PARAM_construct_end()};
    EthKey& k = dir == 0 ? keys.initiator_to_responder : keys.responder_to_initiator;
    const int rc = EVP_KDF_derive(kctx, k.data(), k.size(), params);
    EVP_KDF_CTX_free(kctx);
    if (rc != 1) return Status::IoError("eth: HKDF failed");
  }
  return keys;
}

bool EthReplayWindow::Fresh(std::uint64_t packet) const {
  if (packet == 0) return false;
  if (packet > newest_) return true;
  // Older than the words the bitmap still holds: cannot tell, so treat it as a replay.
  if (newest_ / 64 - packet / 64 >= kWords) return false;
  return !Seen(packet);
}

void EthReplayWindow::Accept(std::uint64_t packet) {
  if (packet > newest_) {
    // The window slides: the words it moves onto start empty.
    const std::uint64_t moved = packet / 64 - newest_ / 64;
    if (newest_ == 0 || moved >= kWords) {
      bits_.fill(0);
    } else {
      for (std::uint64_t w = newest_ / 64 + 1; w <= packet / 64; ++w) bits_[w % kWords] = 0;
    }
    newest_ = packet;
  }
  bits_[(packet / 64) % kWords] |= std::uint64_t{1} << (packet % 64);
}

EthSealer::EthSealer(const EthKey& key) : cipher_(std::make_unique<EthAeadCipher>(key, true)) {}
EthSealer::~EthSealer() = default;

bool EthSealer::Seal(std::uint8_t* frame, std::size_t len) {
  const std::uint16_t flags = Shaped(frame, len) ? GetU16(frame + kFlagsAt) : 0;
  if (!Shaped(frame, len) || (flags & kEthFlagAead) || next_ == 0) {
    ++counters_.malformed;
    return false;
  }
  // Save what Seal changes, so a failure leaves the frame as it was.
  std::uint8_t packet_before[8];
  std::memcpy(packet_before, frame + kPacketAt, 8);
  PutU64(frame + kPacketAt, next_);
  PutU16(frame + kFlagsAt, std::uint16_t(flags | kEthFlagAead));
  std::uint8_t nonce[kNonceSize], aad[kEthOverhead];
  Nonce(frame, nonce);
  Aad(frame, aad);
  if (!cipher_->Run(nonce, aad, sizeof aad, frame + kEthOverhead, len - kEthOverhead, frame + kTagAt)) {
    std::memcpy(frame + kPacketAt, packet_before, 8);
    PutU16(frame + kFlagsAt, flags);
    ++counters_.malformed;
    return false;
  }
  // The last number is never used: next_ == 0 afterwards means "used up", not a wrap to 1.
  next_ = next_ == UINT64_MAX ? 0 : next_ + 1;
  ++counters_.sealed;
  return true;
}

EthOpener::EthOpener(const EthKey& key) : cipher_(std::make_unique<EthAeadCipher>(key, false)) {}
EthOpener::~EthOpener() = default;

bool EthOpener::Open(std::uint8_t* frame, std::size_t len) {
  if (!Shaped(frame, len) || !(GetU16(frame + kFlagsAt) & kEthFlagAead)) {
    ++counters_.malformed;
    return false;
  }
  const std::uint64_t packet = GetU64(frame + kPacketAt);
  if (!window_.Fresh(packet)) {
    ++counters_.replayed;
    return false;
  }
  std::uint8_t nonce[kNonceSize], aad[kEthOverhead], tag[kEthTagSize];
  Nonce(frame, nonce);
  Aad(frame, aad);
  std::memcpy(tag, frame + kTagAt, kEthTagSize);
  // Decrypted in place in the same pass as the tag check (no copy per frame): a frame whose
  // tag fails is dropped by the caller, so what its payload bytes became does not matter.
  const std::size_t n = len - kEthOverhead;
  if (!cipher_->Run(nonce, aad, sizeof aad, frame + kEthOverhead, n, tag)) {
    ++counters_.bad_tag;
    return false;
  }
  window_.Accept(packet);
  ++counters_.opened;
  return true;
}

}  // namespace dst::net
