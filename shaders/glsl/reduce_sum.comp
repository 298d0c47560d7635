#version 450
#extension GL_GOOGLE_include_directive : require
// out[0] += sum(in[0..count)) in u32 (wrapping), so results are exact and order-free.
layout(local_size_x = 256) in;
#include "common.glsl"
layout(std430, binding = 0) readonly buffer In { uint src[]; };
layout(std430, binding = 1) buffer Out { uint total[]; };
layout(push_constant) uniform Push { uint count; } pc;
shared uint part[256];
void main() {
  uint i = LinearIndex();
  uint l = gl_LocalInvocationID.x;
  part[l] = i < pc.count ? src[i] : 0u;
  barrier();
  for (uint s = 128; s > 0; s >>= 1) {
    if (l < s) part[l] += part[l + s];
    barrier();
  }
  if (l == 0 && part[0] != 0u) atomicAdd(total[0], part[0]);
}
