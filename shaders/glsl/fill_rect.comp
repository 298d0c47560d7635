#version 450
// F10 2-D: fill a width x height rectangle of u32 pixels with `value`. The binding starts at
// the rectangle's first pixel; rows are `stride` pixels apart (docs/device-spec.md §2-D kernels).
// The catalogue's push limits keep y * stride + x below 2^31, so the index cannot wrap.
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) writeonly buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint stride; uint width; uint height; uint value; } pc;
void main() {
  uint x = gl_GlobalInvocationID.x, y = gl_GlobalInvocationID.y;
  if (x >= pc.width || y >= pc.height) return;
  dst[y * pc.stride + x] = pc.value;
}
