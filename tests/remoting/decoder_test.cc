// Decoder and validator on hand-built streams: every named error, with the resync
// distance the server uses, and the validator against a client's object table.
#include <doctest.h>

#include <string>

#include "remoting/decoder.h"
#include "shaders/catalogue.h"
#include "tests/remoting/stream.h"

using namespace vg;
using namespace vg::remoting;
using vg::remoting::testing::Stream;
namespace w = vg::remoting::wire;

namespace {

struct DecodeCase {
  const char* name;
  std::vector<std::byte> stream;
  Errc want;
  uint32_t advance;  // resync distance after the error (0: skip to tail)
};

std::vector<std::byte> Pad(size_t n) { return std::vector<std::byte>(n); }

std::vector<DecodeCase> DecodeCases() {
  std::vector<DecodeCase> c;
  c.push_back({"empty stream", {}, Errc::kTruncated, 0});
  c.push_back({"half a header", Pad(4), Errc::kTruncated, 0});
  c.push_back({"size 256 MiB", Stream().Raw(1, 0, {}, 0x10000000).bytes(), Errc::kBadLength, 0});
  {
    auto s = Stream().Raw(0, 0, {}).bytes();
    w::CmdHeader h{0, 0, 4};
    std::memcpy(s.data(), &h, sizeof(h));
    c.push_back({"size under a header", s, Errc::kBadLength, 0});
  }
  c.push_back({"size not a multiple of 8", Stream().Raw(0, 0, Pad(8), 12).bytes(), Errc::kBadLength, 0});
  c.push_back({"size over the command cap", Stream().Raw(0, 0, Pad(8), w::kMaxCommandSize + 8).bytes(),
               Errc::kBadLength, 0});
  c.push_back({"truncated command", Stream().Raw(1, 0, Pad(8), 24).bytes(), Errc::kTruncated, 0});
  c.push_back({"unknown opcode", Stream().Raw(0x77, 0, Pad(8)).bytes(), Errc::kUnknownCommand, 16});
  c.push_back({"opcode one past the table", Stream().Raw(w::kOpCount, 0, {}).bytes(), Errc::kUnknownCommand, 8});
  c.push_back({"nonzero flags", Stream().Cmd(w::Op::kFence, w::FenceCmd{1}, 2).bytes(), Errc::kBadFlags, 16});
  c.push_back({"create too short", Stream().Raw(1, 0, Pad(8)).bytes(), Errc::kBadLength, 16});
  c.push_back({"fence too long", Stream().Raw(8, 0, Pad(16)).bytes(), Errc::kBadLength, 24});
  c.push_back({"dispatch with 5 bindings",
               Stream().Dispatch(1, {1, 1, 1}, std::vector<w::DispatchBinding>(5), Pad(8)).bytes(), Errc::kBadKernel,
               8 + 24 + 5 * 24 + 8});
  c.push_back({"dispatch with 24 push bytes",
               Stream().Dispatch(1, {1, 1, 1}, std::vector<w::DispatchBinding>(1), Pad(24)).bytes(), Errc::kBadKernel,
               8 + 24 + 24 + 24});
  {
    // binding_count says 2, only one binding's bytes follow.
    auto s = Stream().Dispatch(1, {1, 1, 1}, std::vector<w::DispatchBinding>(1), Pad(8)).bytes();
    uint32_t two = 2;
    std::memcpy(s.data() + 8 + offsetof(w::DispatchCmd, binding_count), &two, 4);
    c.push_back({"dispatch counts disagree with size", s, Errc::kBadLength, static_cast<uint32_t>(s.size())});
  }
  return c;
}

}  // namespace

TEST_CASE("decoder: every framing error is named, with its resync distance") {
  for (const auto& t : DecodeCases()) {
    CAPTURE(std::string(t.name));
    Decoded d = DecodeCommand(t.stream, 0);
    REQUIRE_FALSE(d.cmd.ok());
    CHECK_MESSAGE(d.cmd.code() == t.want, d.cmd.error().ToString());
    CHECK(d.advance == t.advance);
  }
}

TEST_CASE("decoder: a well-formed stream decodes command by command") {
  auto s = Stream()
               .Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{7, 0, 4096})
               .Cmd(w::Op::kFill, w::FillCmd{7, 0xabcd, 0, 4096})
               .Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {4, 1, 1}, {{7, 0, 0, 4096}},
                         shaders::PushBytes(shaders::FillPush{1024, 5}))
               .Cmd(w::Op::kFence, w::FenceCmd{1})
               .Raw(0, 0, Pad(24))  // NOP with padding
               .bytes();
  std::vector<w::Op> ops;
  for (size_t off = 0; off < s.size();) {
    Decoded d = DecodeCommand(s, off);
    REQUIRE_MESSAGE(d.cmd.ok(), d.cmd.error().ToString());
    ops.push_back(d.cmd->op);
    off += d.cmd->size;
  }
  CHECK(ops == std::vector<w::Op>{w::Op::kCreateBuffer, w::Op::kFill, w::Op::kDispatch, w::Op::kFence, w::Op::kNop});
  Decoded d = DecodeCommand(s, 16 + 8);
  const auto& f = std::get<w::FillCmd>(d.cmd->payload);
  CHECK(f.value == 0xabcd);
}

namespace {

struct ValidateCase {
  const char* name;
  std::vector<std::byte> cmd;
  Errc want;
};

std::vector<ValidateCase> ValidateCases() {
  using K = shaders::KernelId;
  static const shaders::FillPush kFillPush{1024, 5};  // outlives the spans below
  auto fill_push = shaders::PushBytes(kFillPush);
  auto k = [](K id) { return static_cast<uint32_t>(id); };
  std::vector<ValidateCase> c;
  c.push_back({"create id 0", Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{0, 0, 64}).bytes(),
               Errc::kInvalidArgument});
  c.push_back({"create zero size", Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{9, 0, 0}).bytes(),
               Errc::kInvalidArgument});
  c.push_back({"create size not words", Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{9, 0, 6}).bytes(),
               Errc::kMisaligned});
  c.push_back({"create existing id", Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{1, 0, 64}).bytes(),
               Errc::kAlreadyExists});
  c.push_back({"create over the buffer cap",
               Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{9, 0, 1ull << 40}).bytes(),
               Errc::kLimitExceeded});
  c.push_back({"create over the byte cap",
               Stream().Cmd(w::Op::kCreateBuffer, w::CreateBufferCmd{9, 0, 60 << 10}).bytes(), Errc::kLimitExceeded});
  c.push_back({"destroy never created", Stream().Cmd(w::Op::kDestroyBuffer, w::DestroyBufferCmd{42, 0}).bytes(),
               Errc::kNotFound});
  c.push_back({"destroy twice", Stream().Cmd(w::Op::kDestroyBuffer, w::DestroyBufferCmd{3, 0}).bytes(),
               Errc::kBadState});
  c.push_back({"write after destroy", Stream().Cmd(w::Op::kWrite, w::WriteCmd{3, 0, 0, 0, 4}).bytes(),
               Errc::kBadState});
  c.push_back({"write heap range past heap", Stream().Cmd(w::Op::kWrite, w::WriteCmd{1, 0, 0, 4096, 8}).bytes(),
               Errc::kOutOfBounds});
  c.push_back({"write heap offset wraps",
               Stream().Cmd(w::Op::kWrite, w::WriteCmd{1, 0, 0, ~uint64_t{0} - 3, 8}).bytes(), Errc::kOutOfBounds});
  c.push_back({"write past the buffer", Stream().Cmd(w::Op::kWrite, w::WriteCmd{1, 0, 4000, 0, 200}).bytes(),
               Errc::kOutOfBounds});
  c.push_back({"read past the buffer", Stream().Cmd(w::Op::kRead, w::ReadCmd{1, 0, 4096, 0, 4, 1}).bytes(),
               Errc::kOutOfBounds});
  c.push_back({"read zero bytes", Stream().Cmd(w::Op::kRead, w::ReadCmd{1, 0, 0, 0, 0, 1}).bytes(),
               Errc::kInvalidArgument});
  c.push_back({"copy overlapping", Stream().Cmd(w::Op::kCopy, w::CopyCmd{1, 1, 0, 8, 64}).bytes(), Errc::kOverlap});
  c.push_back({"copy from a stranger", Stream().Cmd(w::Op::kCopy, w::CopyCmd{99, 1, 0, 0, 64}).bytes(),
               Errc::kNotFound});
  c.push_back({"fill misaligned", Stream().Cmd(w::Op::kFill, w::FillCmd{1, 0, 2, 8}).bytes(), Errc::kMisaligned});
  c.push_back({"dispatch unknown kernel", Stream().Dispatch(99, {1, 1, 1}, {{1, 0, 0, 4096}}, fill_push).bytes(),
               Errc::kBadKernel});
  c.push_back({"dispatch wrong binding count",
               Stream().Dispatch(k(K::kFill), {4, 1, 1}, {{1, 0, 0, 4096}, {2, 0, 0, 4096}}, fill_push).bytes(),
               Errc::kBadKernel});
  c.push_back({"dispatch wrong push size",
               Stream().Dispatch(k(K::kFill), {4, 1, 1}, {{1, 0, 0, 4096}}, std::vector<std::byte>(4)).bytes(),
               Errc::kBadKernel});
  c.push_back({"dispatch binding too small for count",
               Stream().Dispatch(k(K::kFill), {4, 1, 1}, {{1, 0, 0, 1024}}, fill_push).bytes(), Errc::kOutOfBounds});
  c.push_back({"dispatch zero groups", Stream().Dispatch(k(K::kFill), {0, 1, 1}, {{1, 0, 0, 4096}}, fill_push).bytes(),
               Errc::kInvalidArgument});
  c.push_back({"dispatch destroyed binding",
               Stream().Dispatch(k(K::kFill), {4, 1, 1}, {{3, 0, 0, 4096}}, fill_push).bytes(), Errc::kBadState});
  // F10 2-D kernels: the same rectangle rule as the auditor's (shaders::ValidateKernelArgs).
  auto rect = [](uint32_t a, uint32_t b, uint32_t c2, uint32_t d2) {
    const shaders::FillRectPush push{a, b, c2, d2};
    auto p = shaders::PushBytes(push);
    return std::vector<std::byte>(p.begin(), p.end());
  };
  c.push_back({"fill_rect past its binding",
               Stream().Dispatch(k(K::kFillRect), {4, 4, 1}, {{1, 0, 0, 4096}}, rect(64, 64, 64, 1)).bytes(),
               Errc::kOutOfBounds});
  c.push_back({"fill_rect stride below width",
               Stream().Dispatch(k(K::kFillRect), {1, 1, 1}, {{1, 0, 0, 4096}}, rect(4, 16, 2, 1)).bytes(),
               Errc::kInvalidArgument});
  c.push_back({"fill_rect huge height",
               Stream().Dispatch(k(K::kFillRect), {1, 1, 1}, {{1, 0, 0, 4096}}, rect(16, 16, 0xFFFFFFFFu, 1)).bytes(),
               Errc::kLimitExceeded});
  c.push_back({"blit source stride lies",
               Stream()
                   .Dispatch(k(K::kBlit), {1, 1, 1}, {{1, 0, 0, 4096}, {2, 0, 0, 4096}}, rect(65536, 16, 16, 2))
                   .bytes(),
               Errc::kOutOfBounds});
  return c;
}

}  // namespace

TEST_CASE("validator: ids, ranges, heap, kernels and caps are checked against this client's table") {
  Limits limits;
  limits.max_bytes = 64 << 10;
  limits.max_buffer = 1 << 20;
  ObjectTable objects(limits);
  objects.DoCreate({1, 0, 4096});
  objects.DoCreate({2, 0, 4096});
  objects.DoCreate({3, 0, 4096});
  objects.DoDestroy(3);
  for (const auto& t : ValidateCases()) {
    CAPTURE(std::string(t.name));
    Decoded d = DecodeCommand(t.cmd, 0);
    REQUIRE_MESSAGE(d.cmd.ok(), d.cmd.error().ToString());
    auto r = ValidateCommand(*d.cmd, objects, 4096);
    REQUIRE_FALSE(r.ok());
    CHECK_MESSAGE(r.code() == t.want, r.error().ToString());
  }
  // And the good twins pass.
  auto good = Stream()
                  .Cmd(w::Op::kWrite, w::WriteCmd{1, 0, 0, 0, 4096})
                  .Cmd(w::Op::kCopy, w::CopyCmd{1, 2, 0, 0, 4096})
                  .Dispatch(static_cast<uint32_t>(shaders::KernelId::kFill), {4, 1, 1}, {{1, 0, 0, 4096}},
                            shaders::PushBytes(shaders::FillPush{1024, 5}))
                  .bytes();
  for (size_t off = 0; off < good.size();) {
    Decoded d = DecodeCommand(good, off);
    REQUIRE(d.cmd.ok());
    auto r = ValidateCommand(*d.cmd, objects, 4096);
    CHECK_MESSAGE(r.ok(), r.error().ToString());
    off += d.cmd->size;
  }
}

TEST_CASE("objects: the live-object cap, tombstones and re-creation") {
  Limits limits;
  limits.max_objects = 2;
  ObjectTable objects(limits);
  objects.DoCreate({1, 0, 64});
  objects.DoCreate({2, 0, 64});
  CHECK(objects.ValidateCreate({3, 0, 64}).code() == Errc::kLimitExceeded);
  objects.DoDestroy(1);
  CHECK(objects.Lookup(1).code() == Errc::kBadState);
  CHECK(objects.ValidateCreate({1, 0, 64}).ok());  // an id may be reused after destroy
  objects.DoCreate({1, 0, 64});
  CHECK(objects.Lookup(1).ok());
  CHECK(objects.live() == 2);
  CHECK(objects.bytes() == 128);
  // Tombstones stay bounded by max_objects.
  for (uint32_t id = 10; id < 20; ++id) {
    objects.DoDestroy(1);
    objects.DoCreate({1, 0, 64});
  }
  CHECK(objects.live() == 2);
}
