#version 450
#extension GL_GOOGLE_include_directive : require
// Latency probe: `iterations` rounds of integer ALU work per invocation. The result is
// stored so the compiler cannot drop the loop.
layout(local_size_x = 256) in;
#include "common.glsl"
layout(std430, binding = 0) writeonly buffer Out { uint result[]; };
layout(push_constant) uniform Push { uint count; uint iterations; uint seed; } pc;
void main() {
  uint i = LinearIndex();
  if (i >= pc.count) return;
  uint x = pc.seed ^ i;
  for (uint it = 0; it < pc.iterations; ++it) {
    x = x * 1664525u + 1013904223u;
    x ^= x >> 13;
  }
  result[i] = x;
}
