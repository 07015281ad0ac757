// classify: serve a bundle (docs/BUNDLE.md) from C++.
//
//   classify::Runtime rt("bundles/digits", {.tta = "hflip", .threads = 2});
//   for (const auto& r : rt.predict_files({"a.jpg", "b.png"}))
//     if (r.ok()) std::cout << rt.topk(r.probs, 3)[0].label << "\n"; else std::cerr << r.error << "\n";
//
// This header is the whole public API and does not include torch, so users compile quickly.
// Preprocessing follows trainer.data.transforms.eval_transform and trainer.tta exactly, with the
// same torch kernels.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace classify {

// Base of every error the library throws; messages name the file and the problem.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// Every message of the classes below starts with its category in brackets, "[schema] ...": schema,
// path, integrity, classes, bundle, image or input (docs/BUNDLE.md "Error categories"; the Python
// loader's BundleError.category holds the same word). A message that already has one keeps it.
inline std::string with_category(const char* category, const std::string& what) {
  return what.rfind('[', 0) == 0 ? what : "[" + std::string(category) + "] " + what;
}
// The bundle cannot be used (missing, unknown schema, tampered artifact, ...); "[bundle]" unless the
// thrower names a more precise category.
class BundleError : public Error {
 public:
  explicit BundleError(const std::string& what) : Error(with_category("bundle", what)) {}
};
// One image cannot be decoded or preprocessed.
class ImageError : public Error {
 public:
  explicit ImageError(const std::string& what) : Error(with_category("image", what)) {}
};
// Bad option (unknown TTA policy, format, device, ...) or a bad input array.
class OptionError : public Error {
 public:
  explicit OptionError(const std::string& what) : Error(with_category("input", what)) {}
};

// An RGB uint8 image, (H, W, 3) row-major.
struct Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> pixels;
};

// Decode JPEG or PNG to RGB (EXIF orientation applied; alpha dropped; gray/palette to RGB;
// 16-bit gray as round(v/257), 16-bit colour as v >> 8, exactly as PIL does).
Image decode_file(const std::string& path);
Image decode_bytes(const uint8_t* data, size_t size, const std::string& label = "<bytes>");

// The manifest's "preprocessing" block.
struct Preprocessing {
  int crop_h = 0, crop_w = 0;
  int resize_size = 0;
  std::string interpolation = "bilinear";  // bilinear | bicubic
  std::string resize_kernel = "float32";   // uint8 | float32 (manifests without the key: float32)
  std::vector<double> mean, std;           // informational: folded into the graph
};

// One TTA view (trainer.tta.TTAView): resize 0 means the preprocessing's resize_size.
struct View {
  int resize = 0;
  std::string crop = "center";  // center | top_left | top_right | bottom_left | bottom_right
  std::string flip = "none";    // none | h | v | hv
};

// Named policy -> views, as trainer.tta.parse_policy.
std::vector<View> parse_tta_policy(const std::string& name);

// (V, 3, crop_h, crop_w) uint8, flattened: the exact tensors the model sees for one image.
std::vector<uint8_t> preprocess_views(const Image& image, const Preprocessing& pre, const std::vector<View>& views);

struct Options {
  std::string format = "auto";  // auto (pt2 when present, else torchscript) | pt2 | torchscript
  std::string tta;              // empty: the bundle's default policy; else a policy name
  int threads = 0;              // intra-op threads; 0 leaves torch's default
  std::string device = "cpu";   // cpu | cuda | cuda:N: picks the artifacts the manifest records for that device
  std::string precision = "fp32";  // fp32 | fp16 | bf16: the CUDA variants of 'python -m export --precision'
  int batch = 16;               // images per forward pass (capped by the bundle's max_batch)
  // Ed25519 public key files (PEM, 'python -m export keygen'): a bundle's signature.json, when present,
  // must verify with one of them (docs/BUNDLE.md, Trust); require_signature refuses unsigned bundles too.
  std::vector<std::string> trusted_keys;
  bool require_signature = false;
  // Non-empty: refuse unless manifest.json's bytes have this sha256 (the Python loader passes the
  // manifest it checked, so its signature check covers what this runtime loads).
  std::string expected_manifest_sha256;
};

struct Result {
  std::string source;        // path or "<bytes #i>"
  std::vector<float> probs;  // (K,) probabilities; empty on error
  std::string error;         // empty when ok
  bool ok() const { return error.empty(); }
};

struct TopK {
  int index;
  std::string label;
  float prob;
};

class Runtime {
 public:
  Runtime(const std::string& bundle_dir, const Options& options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;

  const std::vector<std::string>& classes() const;
  const Preprocessing& preprocessing() const;  // the first model's (ensembles: first member)
  std::string kind() const;                    // model | ensemble
  std::string format() const;                  // pt2 | torchscript (the loaded artifacts)
  std::string device() const;                  // cpu | cuda:N (where the models run)
  const std::vector<View>& views() const;
  std::string merge() const;  // TTA merge rule

  // One result per input, in order; a bad image gives an error result, the others still run.
  std::vector<Result> predict_files(const std::vector<std::string>& paths);
  std::vector<Result> predict_bytes(const std::vector<std::string>& blobs);
  // (N, H, W, 3) uint8 RGB; all images share one size.
  std::vector<Result> predict_pixels(const uint8_t* nhwc, int n, int height, int width);
  std::vector<Result> predict_images(std::vector<Image> images, std::vector<std::string> sources,
                                     std::vector<std::string> errors = {});

  // Raw model call on preprocessed (N, 3, crop_h, crop_w) uint8 -> (N, K) fused probabilities
  // (no TTA; ensembles fuse members). For benchmarks.
  std::vector<float> run_preprocessed(const uint8_t* n3hw, int n);
  // Whether every model takes the same preprocessing (false: an ensemble of different input
  // sizes, where run_preprocessed throws OptionError).
  bool uniform_input() const;

  std::vector<TopK> topk(const std::vector<float>& probs, int k) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The SHA-256 of a file, lowercase hex.
std::string file_sha256(const std::string& path);

}  // namespace classify
