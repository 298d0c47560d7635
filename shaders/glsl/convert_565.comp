#version 450
// F10 2-D: RGB565 -> XRGB8888 (alpha byte 0xFF, so the result is also opaque ARGB8888).
// The source holds 16-bit pixels, two to a u32 (little-endian: the lower half first); its
// binding starts at the rectangle's first pixel, which must therefore sit on a dword (an
// even pixel index). Channels widen by bit replication (r8 = r5 << 3 | r5 >> 2). Strides are
// in pixels of each surface.
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, binding = 1) writeonly buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint src_stride; uint dst_stride; uint width; uint height; } pc;
void main() {
  uint x = gl_GlobalInvocationID.x, y = gl_GlobalInvocationID.y;
  if (x >= pc.width || y >= pc.height) return;
  uint i = y * pc.src_stride + x;
  uint p = (src[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu;
  uint r = (p >> 11) & 31u, g = (p >> 5) & 63u, b = p & 31u;
  r = (r << 3) | (r >> 2);
  g = (g << 2) | (g >> 4);
  b = (b << 3) | (b >> 2);
  dst[y * pc.dst_stride + x] = 0xFF000000u | (r << 16) | (g << 8) | b;
}
