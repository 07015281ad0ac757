// Preprocessing and TTA, a line-by-line port of trainer.data.transforms (resized_shape,
// resize_uint8, center_crop) and trainer.tta (parse_policy, apply_views, merge_probs) that calls
// the same ATen kernels, so the uint8 tensors are identical to Python's.
#include <cmath>
#include <map>

#include "internal.h"

namespace classify {
namespace {

const char* const kCrops[] = {"center", "top_left", "top_right", "bottom_left", "bottom_right"};
const char* const kNamed = "none, hflip, vflip, hvflip, five-crop, ten-crop, multiscale:S1,S2,...";

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n\r"), e = s.find_last_not_of(" \t\n\r");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

// Python's round() on (d / 2): half to even. std::nearbyint uses the current rounding mode,
// which is round-to-nearest-even unless someone changed it.
int64_t half_even_half(int64_t d) { return static_cast<int64_t>(std::nearbyint(static_cast<double>(d) / 2.0)); }

std::pair<int64_t, int64_t> crop_box(int64_t h, int64_t w, int64_t ch, int64_t cw, const std::string& where) {
  if (where == "center") return {half_even_half(h - ch), half_even_half(w - cw)};
  int64_t top = where.rfind("top", 0) == 0 ? 0 : h - ch;
  int64_t left = where.size() >= 4 && where.compare(where.size() - 4, 4, "left") == 0 ? 0 : w - cw;
  return {top, left};
}

}  // namespace

std::vector<View> parse_tta_policy(const std::string& raw) {
  std::string name = trim(raw.empty() ? "none" : raw);
  if (name == "none") return {View{}};
  if (name == "hflip") return {View{}, View{0, "center", "h"}};
  if (name == "vflip") return {View{}, View{0, "center", "v"}};
  if (name == "hvflip") return {View{}, View{0, "center", "h"}, View{0, "center", "v"}, View{0, "center", "hv"}};
  if (name == "five-crop" || name == "ten-crop") {
    std::vector<View> views;
    for (const char* c : kCrops) views.push_back(View{0, c, "none"});
    if (name == "ten-crop")
      for (const char* c : kCrops) views.push_back(View{0, c, "h"});
    return views;
  }
  if (name.rfind("multiscale:", 0) == 0) {
    std::vector<View> views;
    std::string rest = name.substr(11);
    bool bad = false;
    size_t start = 0;
    while (start <= rest.size()) {
      size_t comma = rest.find(',', start);
      std::string item = trim(rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      if (!item.empty()) {
        size_t used = 0;
        int v = 0;
        try {
          v = std::stoi(item, &used);
        } catch (const std::exception&) {
          bad = true;
        }
        if (bad || used != item.size()) {
          bad = true;
          break;
        }
        if (v <= 0) throw OptionError("resize must be positive, got " + std::to_string(v));
        views.push_back(View{v, "center", "none"});
      }
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    if (bad || views.empty())
      throw OptionError("bad TTA policy '" + name + "': write multiscale:S1,S2,... with integer sizes");
    return views;
  }
  throw OptionError("unknown TTA policy '" + name + "'; use one of " + kNamed);
}

void check_views(const std::vector<View>& views, const Preprocessing& pre, const std::string& where) {
  for (const View& v : views) {
    bool crop_ok = false;
    for (const char* c : kCrops) crop_ok = crop_ok || v.crop == c;
    if (!crop_ok) throw OptionError(where + ": unknown TTA crop '" + v.crop + "'; use center, top_left, top_right, bottom_left or bottom_right");
    if (v.flip != "none" && v.flip != "h" && v.flip != "v" && v.flip != "hv")
      throw OptionError(where + ": unknown TTA flip '" + v.flip + "'; use none, h, v or hv");
    int size = v.resize ? v.resize : pre.resize_size;
    if (v.resize < 0) throw OptionError(where + ": TTA resize must be positive, got " + std::to_string(v.resize));
    if (size < std::min(pre.crop_h, pre.crop_w))
      throw OptionError(where + ": TTA resize " + std::to_string(size) + " is smaller than the " +
                        std::to_string(pre.crop_h) + "x" + std::to_string(pre.crop_w) + " crop; use sizes >= " +
                        std::to_string(std::max(pre.crop_h, pre.crop_w)));
  }
}

torch::Tensor image_to_chw(const Image& img) {
  auto hwc = torch::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, 3}, torch::kUInt8);
  return hwc.permute({2, 0, 1}).contiguous();  // (3, H, W) uint8, owns its memory
}

std::pair<int64_t, int64_t> resized_shape(int64_t h, int64_t w, int64_t size) {
  // Python: int(size * w / h); size * w is exact in a double and true division rounds correctly.
  if (h <= w) return {size, static_cast<int64_t>(static_cast<double>(size * w) / static_cast<double>(h))};
  return {static_cast<int64_t>(static_cast<double>(size * h) / static_cast<double>(w)), size};
}

torch::Tensor resize_uint8(const torch::Tensor& img, int64_t out_h, int64_t out_w, const std::string& interpolation,
                           const std::string& kernel) {
  const bool batched = img.dim() == 4;
  torch::Tensor x = batched ? img : img.unsqueeze(0);
  if (x.size(-2) == out_h && x.size(-1) == out_w) return img;
  if (kernel != "uint8" && kernel != "float32")
    throw OptionError("unknown resize_kernel '" + kernel + "'; use uint8 or float32");
  torch::Tensor in = kernel == "uint8" ? x : x.to(torch::kFloat32);  // uint8: torch's integer kernel, as Python
  torch::Tensor y;
  if (interpolation == "bilinear") y = at::_upsample_bilinear2d_aa(in, {out_h, out_w}, false);
  else if (interpolation == "bicubic") y = at::_upsample_bicubic2d_aa(in, {out_h, out_w}, false);
  else throw OptionError("unknown interpolation '" + interpolation + "'; use bilinear or bicubic");
  x = kernel == "uint8" ? y : y.round_().clamp_(0, 255).to(torch::kUInt8);  // round half to even, as torch.round
  return batched ? x : x.squeeze(0);
}

torch::Tensor apply_views(const torch::Tensor& img, const Preprocessing& pre, const std::vector<View>& views) {
  const int64_t h = img.size(-2), w = img.size(-1), ch = pre.crop_h, cw = pre.crop_w;
  std::map<int, torch::Tensor> resized;  // one resize per distinct size
  std::vector<torch::Tensor> out;
  out.reserve(views.size());
  for (const View& v : views) {
    int size = v.resize ? v.resize : pre.resize_size;
    auto it = resized.find(size);
    if (it == resized.end()) {
      auto [rh, rw] = resized_shape(h, w, size);
      it = resized.emplace(size, resize_uint8(img, rh, rw, pre.interpolation, pre.resize_kernel)).first;
    }
    const torch::Tensor& r = it->second;
    const int64_t rh = r.size(-2), rw = r.size(-1);
    if (ch > rh || cw > rw)
      throw ImageError("resize to " + std::to_string(size) + " leaves a " + std::to_string(rh) + "x" +
                       std::to_string(rw) + " image, smaller than the " + std::to_string(ch) + "x" +
                       std::to_string(cw) + " crop");
    auto [top, left] = crop_box(rh, rw, ch, cw, v.crop);
    torch::Tensor x = r.slice(-2, top, top + ch).slice(-1, left, left + cw);
    if (v.flip == "h" || v.flip == "hv") x = x.flip({-1});
    if (v.flip == "v" || v.flip == "hv") x = x.flip({-2});
    out.push_back(x);
  }
  return torch::stack(out).contiguous();  // (V, 3, ch, cw) uint8
}

torch::Tensor merge_probs(const torch::Tensor& probs, const std::string& how) {
  if (how == "mean") return probs.mean(0);
  if (how == "max") {
    torch::Tensor m = std::get<0>(probs.max(0));
    return m / m.sum(-1, true);
  }
  if (how == "vote") {
    const int64_t k = probs.size(-1);
    torch::Tensor votes = torch::one_hot(probs.argmax(-1), k).sum(0).to(torch::kFloat32);  // (N, K)
    return votes / static_cast<double>(probs.size(0));
  }
  throw OptionError("unknown TTA merge '" + how + "'; use mean, max or vote");
}

std::vector<uint8_t> preprocess_views(const Image& image, const Preprocessing& pre, const std::vector<View>& views) {
  check_views(views, pre, "preprocess_views");
  torch::Tensor t = apply_views(image_to_chw(image), pre, views);
  const uint8_t* p = t.data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + t.numel());
}

}  // namespace classify
