#version 450
// C[MxN] = A[MxK] * B[KxN], row-major f32, 16x16 tiles staged through shared memory.
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) writeonly buffer C { float c[]; };
layout(push_constant) uniform Push { uint m; uint n; uint k; } pc;
const uint T = 16;
shared float ta[T][T];
shared float tb[T][T];
void main() {
  uint lx = gl_LocalInvocationID.x, ly = gl_LocalInvocationID.y;
  uint col = gl_WorkGroupID.x * T + lx;
  uint row = gl_WorkGroupID.y * T + ly;
  float acc = 0.0;
  for (uint t = 0; t < pc.k; t += T) {
    // Out-of-range tile entries load as zero so partial tiles need no special case.
    ta[ly][lx] = (row < pc.m && t + lx < pc.k) ? a[row * pc.k + t + lx] : 0.0;
    tb[ly][lx] = (col < pc.n && t + ly < pc.k) ? b[(t + ly) * pc.n + col] : 0.0;
    barrier();
    for (uint i = 0; i < T; ++i) acc += ta[ly][i] * tb[i][lx];
    barrier();
  }
  if (row < pc.m && col < pc.n) c[row * pc.n + col] = acc;
}
