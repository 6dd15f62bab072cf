// SendFrames on a stream socket descriptor (private to netdriver/src): gathers the frame list
// (GatherFrames, transport.h) into `iov` and writes it with one non-blocking sendmsg().  Shared
// by TcpTransport and the Transmitter's bare-socket sink.
#pragma once

#include "dst/net/transport.h"

namespace dst::net::detail {

std::size_t SendFramesOnFd(int fd, const TxFrame* head, std::size_t offset, const SendLimits& lim,
                           struct iovec* iov, int max_iov, boost::system::error_code& ec);

}  // namespace dst::net::detail
