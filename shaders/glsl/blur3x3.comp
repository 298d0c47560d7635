#version 450
// 3x3 binomial blur on u32 pixels, weights [1 2 1; 2 4 2; 1 2 1] / 16, clamp-to-edge.
// Integer arithmetic (wrapping) so the CPU reference matches bit for bit.
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, binding = 1) writeonly buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint width; uint height; } pc;
void main() {
  uint x = gl_GlobalInvocationID.x, y = gl_GlobalInvocationID.y;
  if (x >= pc.width || y >= pc.height) return;
  uint acc = 0u;
  for (int dy = -1; dy <= 1; ++dy) {
    for (int dx = -1; dx <= 1; ++dx) {
      uint sx = uint(clamp(int(x) + dx, 0, int(pc.width) - 1));
      uint sy = uint(clamp(int(y) + dy, 0, int(pc.height) - 1));
      uint w = (dx == 0 ? 2u : 1u) * (dy == 0 ? 2u : 1u);
      acc += w * src[sy * pc.width + sx];
    }
  }
  dst[y * pc.width + x] = acc >> 4;
}
