// Built when libfuse3 is missing: the Manager works, the live tree does not.

#include "mdev/mdev.h"

namespace vg::mdev {

struct MdevTree::Impl {
  std::filesystem::path mountpoint;
};

bool TreeSupported() { return false; }

MdevTree::MdevTree(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MdevTree::~MdevTree() = default;
const std::filesystem::path& MdevTree::mountpoint() const { return impl_->mountpoint; }

Result<std::unique_ptr<MdevTree>> MdevTree::Mount(Manager&, const std::filesystem::path& mountpoint) {
  return MakeError(Errc::kUnsupported, "built without libfuse3: cannot serve the mdev tree on {}", mountpoint.string());
}

}  // namespace vg::mdev
