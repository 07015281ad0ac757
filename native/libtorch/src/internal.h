// Internal helpers shared by the library's translation units (not installed, not public API).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "classify/runtime.h"

namespace classify {

// EXIF orientation (1..8) from a TIFF block ("II*\0" / "MM\0*" header); 0 when the block has no
// orientation tag or is malformed (PIL then looks at XMP).
int exif_orientation(const uint8_t* tiff, size_t size);
// XMP's tiff:Orientation digit (0..9, PIL's regex); 0 when absent.
int xmp_orientation(const char* xmp, size_t size);
// ImageMagick's "Raw profile type exif" PNG text (name, length, hex lines) as bytes; nullopt when
// the hex is malformed (the profile is then ignored, as trainer.data.images does).
std::optional<std::vector<uint8_t>> raw_profile_bytes(const char* text, size_t size);
// PIL's Image.getexif orientation: the EXIF block (null: none; an "Exif\0\0" prefix is skipped),
// and when that has no orientation tag, the XMP packet's.
int image_orientation(const uint8_t* exif, size_t exif_size, const std::string& xmp);
// Apply orientation as PIL's ImageOps.exif_transpose does (2..8; anything else is a no-op).
Image apply_orientation(Image img, int orientation);

// (H, W, 3) uint8 image -> (3, H, W) uint8 tensor (a copy).
torch::Tensor image_to_chw(const Image& img);
// trainer.data.transforms.resized_shape: shorter side to size, longer truncated.
std::pair<int64_t, int64_t> resized_shape(int64_t h, int64_t w, int64_t size);
// trainer.data.transforms.resize_uint8 for (3, H, W) or (N, 3, H, W) uint8.
torch::Tensor resize_uint8(const torch::Tensor& img, int64_t out_h, int64_t out_w, const std::string& interpolation,
                           const std::string& kernel);
// trainer.tta.apply_views: (3, H, W) uint8 -> (V, 3, ch, cw) uint8.
torch::Tensor apply_views(const torch::Tensor& chw, const Preprocessing& pre, const std::vector<View>& views);
// trainer.tta.merge_probs: (V, N, K) -> (N, K).
torch::Tensor merge_probs(const torch::Tensor& probs, const std::string& how);
void check_views(const std::vector<View>& views, const Preprocessing& pre, const std::string& where);

// ---- bundles (manifest.cpp) -----------------------------------------------------------------
struct Artifact {
  std::string key, file, format, sha256;
  std::string device = "cpu";      // cpu | cuda: where the artifact was compiled to run (manifest "device")
  std::string precision = "fp32";  // fp32 | fp16 | bf16 (weights and activations; input and output as always)
  // .pt2 only: batch size -> name of a model compiled for exactly that batch (weights prepacked).
  std::map<int64_t, std::string> static_batch_models;
  // CPU .pt2 only ("compiled_for", export/portable.py): the x86-64 level, the CPU features its code may
  // use (/proc/cpuinfo names), the machine and the torch version it was compiled with. Empty cpu_isa:
  // a bundle from before these records, not checked.
  std::string cpu_isa, march, machine, torch_version;
  std::vector<std::string> cpu_features;
};

struct Member;

// A parsed, validated manifest.json (schema_version 1); see docs/BUNDLE.md.
struct Bundle {
  std::string dir;            // the bundle folder
  std::string manifest_path;  // dir + "/manifest.json"
  std::string manifest_bytes;  // the exact bytes parsed: what signatures and manifest_sha256 are checked against
  std::string kind;           // model | ensemble
  std::string name;
  std::vector<std::string> classes;
  std::string tta_default = "none";
  std::string tta_merge = "mean";
  std::vector<View> tta_views;
  // kind == "model"
  Preprocessing pre;
  int max_batch = 1;
  std::vector<Artifact> artifacts;
  // kind == "ensemble"
  std::string fusion;
  std::vector<Member> members;

  const Artifact* artifact(const std::string& key) const;
  // The artifact of format family "pt2" or "torchscript" for device kind cpu|cuda and a precision.
  const Artifact* find(const std::string& family, const std::string& device, const std::string& precision) const;
};

struct Member {
  std::string name;
  double weight = 1.0;
  Bundle bundle;
};

// Read dir/manifest.json (and, for ensembles, each member's, checking manifest_sha256).
// Throws BundleError naming the file and the fix.
Bundle read_bundle(const std::string& dir);
// The artifact's bytes, read once and checked against the manifest's sha256 (load from these, never
// from the path again); throws BundleError when missing or tampered.
std::string read_checked_artifact(const Bundle& b, const std::string& key);
std::string sha256_hex(const std::string& data);
// Why this machine cannot load the CPU .pt2 `a` (its CPU lacks a recorded feature, another machine
// type, another torch release), with the fix; empty when it can. export.portable.pt2_problem's twin.
std::string pt2_problem(const Bundle& b, const Artifact& a);

// ---- signatures (signature.cpp) -------------------------------------------------------------
// Check dir/signature.json (Ed25519 over b.manifest_bytes) against the trusted PEM public key files.
// Returns the signing key's id; "" when no key is given, or when unsigned and not required.
// Throws BundleError (unsigned but required, untrusted key, modified manifest or signature) or
// OptionError (unreadable key, required without a key).
std::string check_signature(const Bundle& b, const std::vector<std::string>& trusted_keys, bool require);

// ---- models (model.cpp) ---------------------------------------------------------------------
class Model {
 public:
  virtual ~Model() = default;
  // (N, 3, H, W) uint8 on the model's device -> (N, K) float32 probabilities.
  virtual torch::Tensor run(const torch::Tensor& images) = 0;
};
// bytes: the artifact file's content (read_checked_artifact); label: its path, for messages.
std::unique_ptr<Model> load_model(const std::string& bytes, const std::string& label, const Artifact& artifact,
                                  const torch::Device& device);

}  // namespace classify
