// EXIF orientation: find it where PIL's Image.getexif does (an EXIF block; failing a tag there,
// XMP's tiff:Orientation) and apply it as PIL's ImageOps.exif_transpose.
#include <cstring>
#include <optional>

#include "internal.h"

namespace classify {

int exif_orientation(const uint8_t* t, size_t n) {
  if (n < 8) return 1;
  bool le;
  if (t[0] == 'I' && t[1] == 'I') le = true;
  else if (t[0] == 'M' && t[1] == 'M') le = false;
  else return 1;
  auto u16 = [&](size_t o) -> uint32_t { return le ? (t[o] | t[o + 1] << 8) : (t[o] << 8 | t[o + 1]); };
  auto u32 = [&](size_t o) -> uint32_t {
    return le ? (t[o] | t[o + 1] << 8 | t[o + 2] << 16 | static_cast<uint32_t>(t[o + 3]) << 24)
              : (static_cast<uint32_t>(t[o]) << 24 | t[o + 1] << 16 | t[o + 2] << 8 | t[o + 3]);
  };
  if (u16(2) != 42) return 0;
  size_t ifd = u32(4);
  if (ifd + 2 > n) return 0;
  size_t count = u16(ifd);
  for (size_t i = 0; i < count; ++i) {
    size_t e = ifd + 2 + 12 * i;
    if (e + 12 > n) return 0;
    if (u16(e) != 0x0112) continue;
    uint32_t type = u16(e + 2);
    uint32_t v = type == 3 ? u16(e + 8) : (type == 4 ? u32(e + 8) : 1);
    return (v >= 1 && v <= 8) ? static_cast<int>(v) : 1;  // a tag PIL cannot apply is still a tag
  }
  return 0;
}

int xmp_orientation(const char* xmp, size_t n) {
  // PIL: the first match of r'tiff:Orientation(="|>)([0-9])'
  static const char kTag[] = "tiff:Orientation";
  const size_t tag = sizeof(kTag) - 1;
  for (size_t i = 0; i + tag < n; ++i) {
    if (std::memcmp(xmp + i, kTag, tag) != 0) continue;
    size_t j = i + tag;
    if (xmp[j] == '>') j += 1;
    else if (xmp[j] == '=' && j + 1 < n && xmp[j + 1] == '"') j += 2;
    else continue;
    if (j < n && xmp[j] >= '0' && xmp[j] <= '9') return xmp[j] - '0';
  }
  return 0;
}

std::optional<std::vector<uint8_t>> raw_profile_bytes(const char* text, size_t n) {
  // PIL: bytes.fromhex("".join(text.split("\n")[3:])); whitespace may separate bytes, not digits
  size_t i = 0;
  for (int lines = 0; lines < 3; ++i) {
    if (i >= n) return std::vector<uint8_t>{};
    if (text[i] == '\n') ++lines;
  }
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; };
  std::vector<uint8_t> out;
  for (; i < n; ++i) {
    if (text[i] == '\n' || space(text[i])) continue;
    size_t j = i + 1;
    while (j < n && text[j] == '\n') ++j;  // the join removed line breaks, even inside a byte
    if (j >= n || hex(text[i]) < 0 || hex(text[j]) < 0) return std::nullopt;
    out.push_back(static_cast<uint8_t>(hex(text[i]) << 4 | hex(text[j])));
    i = j;
  }
  return out;
}

int image_orientation(const uint8_t* exif, size_t exif_size, const std::string& xmp) {
  int o = 0;
  if (exif) {
    if (exif_size >= 6 && std::memcmp(exif, "Exif\0\0", 6) == 0) exif += 6, exif_size -= 6;
    o = exif_orientation(exif, exif_size);
  }
  if (o == 0) o = xmp_orientation(xmp.data(), xmp.size());
  return o;
}

Image apply_orientation(Image img, int o) {
  if (o < 2 || o > 8) return img;
  const int w = img.width, h = img.height;
  const bool swap = o >= 5;  // TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90 swap the sides
  Image out;
  out.width = swap ? h : w;
  out.height = swap ? w : h;
  out.pixels.resize(img.pixels.size());
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // source pixel, in PIL's transpose terms
      switch (o) {
        case 2: sx = w - 1 - x; break;                       // FLIP_LEFT_RIGHT
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;       // ROTATE_180
        case 4: sy = h - 1 - y; break;                       // FLIP_TOP_BOTTOM
        case 5: sx = y; sy = x; break;                       // TRANSPOSE
        case 6: sx = y; sy = h - 1 - x; break;               // ROTATE_270 (clockwise)
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;       // TRANSVERSE
        case 8: sx = w - 1 - y; sy = x; break;               // ROTATE_90 (counter-clockwise)
      }
      std::memcpy(&out.pixels[(static_cast<size_t>(y) * out.width + x) * 3],
                  &img.pixels[(static_cast<size_t>(sy) * w + sx) * 3], 3);
    }
  }
  return out;
}

}  // namespace classify
