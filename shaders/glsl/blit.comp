#version 450
// F10 2-D: copy a width x height rectangle of u32 pixels. Each binding starts at its
// rectangle's first pixel; rows are src_stride / dst_stride pixels apart. Invocations run in
// parallel: if the two rectangles overlap in memory the result inside the destination is
// undefined (never outside it); guest::Blit goes through a scratch surface in that case, which
// gives the memmove result (docs/device-spec.md §2-D kernels).
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, binding = 1) writeonly buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint src_stride; uint dst_stride; uint width; uint height; } pc;
void main() {
  uint x = gl_GlobalInvocationID.x, y = gl_GlobalInvocationID.y;
  if (x >= pc.width || y >= pc.height) return;
  dst[y * pc.dst_stride + x] = src[y * pc.src_stride + x];
}
