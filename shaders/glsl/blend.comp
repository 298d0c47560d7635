#version 450
// F10 2-D: Porter-Duff src-over of premultiplied ARGB8888 (0xAARRGGBB in a u32):
// dst.c = min(255, src.c + div255(dst.c * (255 - src.a))) for each of A, R, G, B, where
// div255(t) = (t + 128 + ((t + 128) >> 8)) >> 8 is t / 255 rounded to nearest, in integers,
// so the CPU reference matches bit for bit. Rectangles as in blit.comp.
layout(local_size_x = 16, local_size_y = 16) in;
layout(std430, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, binding = 1) buffer Dst { uint dst[]; };
layout(push_constant) uniform Push { uint src_stride; uint dst_stride; uint width; uint height; } pc;
void main() {
  uint x = gl_GlobalInvocationID.x, y = gl_GlobalInvocationID.y;
  if (x >= pc.width || y >= pc.height) return;
  uint s = src[y * pc.src_stride + x];
  uint di = y * pc.dst_stride + x;
  uint d = dst[di];
  uint inv = 255u - (s >> 24);
  uint o = 0u;
  for (uint sh = 0u; sh < 32u; sh += 8u) {
    uint t = ((d >> sh) & 255u) * inv + 128u;
    uint c = ((s >> sh) & 255u) + ((t + (t >> 8)) >> 8);
    o |= min(c, 255u) << sh;
  }
  dst[di] = o;
}
