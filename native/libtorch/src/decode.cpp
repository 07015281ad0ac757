// JPEG (libjpeg-turbo) and PNG (libpng) decoding to RGB uint8, matching
// trainer.data.images.decode_image (PIL) pixel for pixel:
// - JPEG: libjpeg's defaults, which are PIL's (ISLOW DCT, fancy upsampling); gray replicated;
//   CMYK/YCCK converted with PIL's cmyk2rgb, the ink values taken as inverted (Photoshop's
//   convention) when an Adobe APP14 marker is present and as plain CMYK when not (PIL inverts
//   both; decode_image undoes that for the marker-less case); a truncated file is an error.
//   MPO (a JPEG with an MPF secondary image, as phone cameras write) is its first frame: libjpeg
//   stops at the first EOI, PIL decodes frame 0.
// - A multi-scan JPEG (jpeg_has_multiple_scans: progressive, or a first scan without every
//   component) with more than kMaxJpegScans scans before its first EOI is refused before decoding,
//   as decode_image (each scan is another pass over the whole image).
// - PNG: palette expanded, low-bit gray scaled (x85 / x17 / x255), alpha dropped, 16-bit gray
//   as round(v/257) (PIL's I;16 path in decode_image), 16-bit colour or gray+alpha as the high
//   byte (PIL's RGB;16B / LA;16B raw modes).
// - Orientation where PIL's getexif finds it (JPEG: the first APP1 Exif block, else the XMP
//   packet; PNG: eXIf, else the "Raw profile type exif" text chunk, else XMP), applied as
//   ImageOps.exif_transpose.
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "classify/runtime.h"
#include "internal.h"

namespace classify {
namespace {

constexpr long long kMaxPixels = 2LL * 16384 * 16384;  // PIL's decompression-bomb limit
constexpr int kMaxJpegScans = 500;  // trainer.data.images.MAX_JPEG_SCANS (libjpeg-turbo's fuzzers' limit)

void check_size(long long h, long long w, const std::string& label) {
  if (h <= 0 || w <= 0) throw ImageError(label + ": decoded to an empty image");
  if (h * w > kMaxPixels)
    throw ImageError(label + ": image too large (" + std::to_string(w) + "x" + std::to_string(h) +
                     " pixels; the limit is " + std::to_string(kMaxPixels) + ")");
}

// ---- JPEG ---------------------------------------------------------------------------------
struct JpegErr {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX] = {0};
  bool truncated = false;
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void jpeg_emit(j_common_ptr cinfo, int level) {
  // Warnings are level -1; a premature end of data means a truncated file, which PIL refuses.
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) reinterpret_cast<JpegErr*>(cinfo->err)->truncated = true;
}

bool starts_with(jpeg_saved_marker_ptr m, const char* prefix, size_t n) {
  return m->data_length >= n && std::memcmp(m->data, prefix, n) == 0;
}

int orientation_from_jpeg(jpeg_decompress_struct& cinfo) {
  static const char kXmp[] = "http://ns.adobe.com/xap/1.0/";  // + NUL, as PIL's prefix
  const uint8_t* exif = nullptr;
  size_t exif_size = 0;
  std::string xmp;
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next) {
    if (m->marker != JPEG_APP0 + 1) continue;
    if (!exif && starts_with(m, "Exif\0\0", 6)) {  // the first Exif block, as PIL
      exif = m->data;
      exif_size = m->data_length;
    } else if (starts_with(m, kXmp, sizeof(kXmp))) {  // the last XMP packet, as PIL
      xmp.assign(reinterpret_cast<const char*>(m->data) + sizeof(kXmp), m->data_length - sizeof(kXmp));
    }
  }
  return image_orientation(exif, exif_size, xmp);
}

// An APP14 segment that starts "Adobe" (PIL's test; libjpeg also reads its colour transform).
bool has_adobe_marker(jpeg_decompress_struct& cinfo) {
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 14 && starts_with(m, "Adobe", 5)) return true;
  return false;
}

uint8_t clip8(int v) { return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v)); }

// PIL's Convert.c cmyk2rgb: nk = 255 - k; out = nk - c * nk / 255 (rounded with MULDIV255).
void cmyk_to_rgb(const uint8_t* in, uint8_t* out, int width, bool inverted) {
  for (int x = 0; x < width; ++x) {
    int c[4];
    for (int i = 0; i < 4; ++i) c[i] = inverted ? 255 - in[4 * x + i] : in[4 * x + i];
    int nk = 255 - c[3];
    for (int i = 0; i < 3; ++i) {
      int tmp = c[i] * nk + 128;
      out[3 * x + i] = clip8(nk - (((tmp >> 8) + tmp) >> 8));
    }
  }
}

// The next marker at or after pos, found as libjpeg's next_marker does (and images.py's
// _next_marker): other bytes skipped, FF fill bytes skipped, FF 00 (stuffing) is no marker.
// Returns its code and leaves pos after it; -1 at the end of the data.
int next_marker(const uint8_t* data, size_t size, size_t& pos) {
  while (pos < size) {
    const void* ff = std::memchr(data + pos, 0xFF, size - pos);
    if (!ff) break;
    size_t at = static_cast<size_t>(static_cast<const uint8_t*>(ff) - data) + 1;
    while (at < size && data[at] == 0xFF) ++at;
    if (at >= size) break;
    pos = at + 1;
    if (data[at] != 0) return data[at];
  }
  pos = size;
  return -1;
}

// More than `limit` SOS markers before the first EOI (segments skipped by their length, entropy-
// coded data by next_marker): images.py's jpeg_scans_exceed, byte for byte.
bool jpeg_scans_exceed(const uint8_t* data, size_t size, int limit) {
  size_t pos = 2;  // after SOI
  int scans = 0;
  for (;;) {
    const int code = next_marker(data, size, pos);
    if (code < 0 || code == 0xD9) return false;              // end of data, EOI
    if (code == 0x01 || (code >= 0xD0 && code <= 0xD8)) continue;  // TEM, RSTn, SOI: no segment
    if (code == 0xDA && ++scans > limit) return true;
    pos += pos + 2 <= size ? static_cast<size_t>(data[pos] << 8 | data[pos + 1]) : size;
  }
}

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& label) {
  jpeg_decompress_struct cinfo;
  JpegErr err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  err.mgr.emit_message = jpeg_emit;
  // Buffers live on the heap behind a pointer that is not modified after setjmp, so their state
  // is well defined when libjpeg longjmps back here.
  struct Buffers { Image img; std::vector<uint8_t> row; };
  auto buf = std::make_unique<Buffers>();
  Image& img = buf->img;
  std::vector<uint8_t>& row = buf->row;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw ImageError(label + ": unreadable JPEG (" + err.message + ")");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 14, 16);
  jpeg_read_header(&cinfo, TRUE);
  if (static_cast<long long>(cinfo.image_width) * cinfo.image_height > kMaxPixels) {
    jpeg_destroy_decompress(&cinfo);
    check_size(cinfo.image_height, cinfo.image_width, label);
  }
  if (jpeg_has_multiple_scans(&cinfo) && jpeg_scans_exceed(data, size, kMaxJpegScans)) {
    jpeg_destroy_decompress(&cinfo);
    throw ImageError(label + ": unreadable image (JPEG with more than " + std::to_string(kMaxJpegScans) +
                     " scans: a progressive JPEG has about 10, and each scan is another pass over the image; re-encode it)");
  }
  bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  // Adobe marker: inverted ink values (what Photoshop and PIL write); none: plain CMYK.
  bool inverted = cmyk && has_adobe_marker(cinfo);
  cinfo.out_color_space = cmyk ? JCS_CMYK : (cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB);
  // Defaults spelled out: these are the settings PIL decodes with.
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  int orientation = orientation_from_jpeg(cinfo);
  jpeg_start_decompress(&cinfo);
  const int w = static_cast<int>(cinfo.output_width), h = static_cast<int>(cinfo.output_height);
  img.height = h;
  img.width = w;
  img.pixels.resize(static_cast<size_t>(h) * w * 3);
  const int comps = cinfo.output_components;
  row.resize(static_cast<size_t>(w) * comps);
  while (cinfo.output_scanline < cinfo.output_height) {
    const int y = static_cast<int>(cinfo.output_scanline);
    JSAMPROW rp = row.data();
    jpeg_read_scanlines(&cinfo, &rp, 1);
    uint8_t* out = img.pixels.data() + static_cast<size_t>(y) * w * 3;
    if (comps == 3) {
      std::memcpy(out, row.data(), static_cast<size_t>(w) * 3);
    } else if (comps == 1) {
      for (int x = 0; x < w; ++x) out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = row[x];
    } else {
      cmyk_to_rgb(row.data(), out, w, inverted);
    }
    if (err.truncated) break;
  }
  if (!err.truncated) jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (err.truncated) throw ImageError(label + ": unreadable JPEG (image file is truncated)");
  return apply_orientation(std::move(img), orientation);
}

// ---- PNG ----------------------------------------------------------------------------------
struct PngReader {
  const uint8_t* data;
  size_t size;
  size_t pos;
  std::string message;
};

void png_read_mem(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (r->pos + n > r->size) png_error(png, "image file is truncated");
  std::memcpy(out, r->data + r->pos, n);
  r->pos += n;
}

void png_on_error(png_structp png, png_const_charp msg) {
  static_cast<PngReader*>(png_get_error_ptr(png))->message = msg;
  png_longjmp(png, 1);
}
void png_on_warning(png_structp, png_const_charp) {}

// eXIf (a bare TIFF block; some writers keep the "Exif\0\0" prefix, which is skipped), else the
// last "Raw profile type exif" text chunk (tEXt, zTXt or iTXt: ImageMagick's hex dump), else the
// XMP packet's tiff:Orientation: PIL's order.
int orientation_from_png(png_structp png, png_infop info) {
  png_bytep exif = nullptr;
  png_uint_32 exif_len = 0;
  std::optional<std::vector<uint8_t>> raw;
  std::string xmp;
  png_textp text = nullptr;
  int num_text = 0;
  png_get_text(png, info, &text, &num_text);
  for (int i = 0; i < num_text; ++i) {
    const size_t n = text[i].compression >= PNG_ITXT_COMPRESSION_NONE ? text[i].itxt_length : text[i].text_length;
    if (std::strcmp(text[i].key, "Raw profile type exif") == 0) raw = raw_profile_bytes(text[i].text, n);
    else if (std::strcmp(text[i].key, "XML:com.adobe.xmp") == 0) xmp.assign(text[i].text, n);
  }
  if (png_get_eXIf_1(png, info, &exif_len, &exif) && exif && exif_len > 0) return image_orientation(exif, exif_len, xmp);
  if (raw) return image_orientation(raw->data(), raw->size(), xmp);
  return image_orientation(nullptr, 0, xmp);
}

Image decode_png(const uint8_t* data, size_t size, const std::string& label) {
  PngReader reader{data, size, 0, {}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, png_on_error, png_on_warning);
  if (!png) throw ImageError(label + ": out of memory creating the PNG reader");
  png_infop info = png_create_info_struct(png);
  struct Buffers { Image img; std::vector<uint8_t> raw; std::vector<png_bytep> rows; int orientation = 1; };
  auto buf = std::make_unique<Buffers>();  // see decode_jpeg: stable across longjmp
  Image& img = buf->img;
  std::vector<uint8_t>& raw = buf->raw;
  std::vector<png_bytep>& rows = buf->rows;
  int& orientation = buf->orientation;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw ImageError(label + ": unreadable PNG (" + reader.message + ")");
  }
  png_set_read_fn(png, &reader, png_read_mem);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, info);
  png_uint_32 w = 0, h = 0;
  int depth = 0, color = 0;
  png_get_IHDR(png, info, &w, &h, &depth, &color, nullptr, nullptr, nullptr);
  if (static_cast<long long>(w) * h > kMaxPixels || w == 0 || h == 0) {
    reader.message = "bad or too large dimensions " + std::to_string(w) + "x" + std::to_string(h);
    png_longjmp(png, 1);
  }
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);  // no tRNS_to_alpha: alpha dropped anyway
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const int channels = png_get_channels(png, info);
  const int out_depth = png_get_bit_depth(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  raw.resize(rowbytes * h);
  rows.resize(h);
  for (png_uint_32 y = 0; y < h; ++y) rows[y] = raw.data() + y * rowbytes;
  png_read_image(png, rows.data());
  png_read_end(png, info);
  orientation = orientation_from_png(png, info);
  png_destroy_read_struct(&png, &info, nullptr);

  img.height = static_cast<int>(h);
  img.width = static_cast<int>(w);
  img.pixels.resize(static_cast<size_t>(h) * w * 3);
  const bool wide = out_depth == 16;
  for (png_uint_32 y = 0; y < h; ++y) {
    const uint8_t* in = rows[y];
    uint8_t* out = img.pixels.data() + static_cast<size_t>(y) * w * 3;
    for (png_uint_32 x = 0; x < w; ++x) {
      const uint8_t* px = in + static_cast<size_t>(x) * channels * (wide ? 2 : 1);
      if (channels >= 3) {  // RGB / RGBA: 8-bit as is, 16-bit big-endian high byte
        for (int c = 0; c < 3; ++c) out[3 * x + c] = px[wide ? 2 * c : c];
      } else {
        uint8_t g;
        if (!wide) g = px[0];
        else if (channels == 1) g = static_cast<uint8_t>(((px[0] << 8 | px[1]) + 128) / 257);  // round(v/257)
        else g = px[0];  // 16-bit gray + alpha: high byte (LA;16B)
        out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = g;
      }
    }
  }
  return apply_orientation(std::move(img), orientation);
}

}  // namespace

Image decode_bytes(const uint8_t* data, size_t size, const std::string& label) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, size, label);
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) return decode_png(data, size, label);
  if (size == 0) throw ImageError(label + ": unreadable image (empty file)");
  throw ImageError(label + ": unreadable image (not a recognised image format; the native runtime reads JPEG and PNG)");
}

Image decode_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ImageError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw ImageError(path + ": read error");
  return decode_bytes(bytes.data(), bytes.size(), path);
}

}  // namespace classify
