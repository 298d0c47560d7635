#pragma once
// Runs one shaders::KernelSample through a remoting client: create buffers, write the
// inputs through the heap, dispatch, fence, read every binding back. Shared by the
// in-process and e2e tests so both check exactly what the mediated path checks.

#include <vector>

#include "guest/remoting_client.h"
#include "shaders/samples.h"

namespace vg::remoting::testing {

inline Result<std::vector<std::vector<std::byte>>> RunSample(guest::RemotingClient& c, const shaders::KernelSample& s) {
  std::vector<guest::RemoteBuffer> bufs;
  std::vector<guest::RemoteBinding> binds;
  for (const auto& init : s.bindings) {
    VG_TRY_ASSIGN(auto b, c.CreateBuffer(init.size()));
    VG_TRY(c.Write(b, 0, init));
    bufs.push_back(b);
    binds.push_back(guest::Bind(b));
  }
  VG_TRY(c.Dispatch(s.kernel, s.groups, binds, s.push));
  VG_TRY_ASSIGN(uint64_t seq, c.Submit());
  VG_TRY(c.Wait(seq));
  std::vector<std::vector<std::byte>> out;
  for (size_t i = 0; i < bufs.size(); ++i) {
    out.emplace_back(s.bindings[i].size());
    VG_TRY(c.Read(bufs[i], 0, out.back()));
  }
  for (const auto& b : bufs) VG_TRY(c.DestroyBuffer(b));
  return out;
}

}  // namespace vg::remoting::testing
