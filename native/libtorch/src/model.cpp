// The two artifact formats the native runtime runs: TorchScript (torch::jit::load) and
// AOTInductor packages (.pt2, AOTIModelPackageLoader). Both take (N, 3, H, W) uint8 and return
// (N, K) float32 probabilities: normalisation and softmax are folded into the graph.
// Both load from the bytes whose sha256 was checked (read_checked_artifact), never from the path again.
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include "internal.h"

namespace classify {
namespace {
namespace fs = std::filesystem;

// AOTIModelPackageLoader only takes a path: the checked bytes go to a private directory (mkdtemp,
// mode 0700) that no other user can write, and it is removed once the package is loaded.
class PrivateCopy {
 public:
  PrivateCopy(const std::string& bytes, const std::string& label) {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = (fs::path(tmp && *tmp ? tmp : "/tmp") / "classify-XXXXXX").string();
    if (!mkdtemp(templ.data())) throw BundleError(label + ": cannot create a private temporary folder to load it from");
    dir_ = templ;
    path_ = (fs::path(dir_) / "model.pt2").string();
    std::ofstream out(path_, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.flush()) throw BundleError(label + ": cannot write a private copy to " + path_ + " (disk full?)");
  }
  ~PrivateCopy() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(const std::string& bytes, const std::string& path, const torch::Device& device) {
    try {
      std::istringstream in(bytes);
      module_ = torch::jit::load(in, device);
    } catch (const c10::Error& e) {
      throw BundleError(path + ": cannot load TorchScript (" + e.what_without_backtrace() +
                        "); re-export the bundle with this torch version");
    }
    module_.eval();
  }
  torch::Tensor run(const torch::Tensor& images) override {
    return module_.forward({images}).toTensor();
  }

 private:
  torch::jit::Module module_;
};

// A .pt2 package holds the dynamic-batch model "model" and, per the manifest, models compiled for one
// exact batch size (static shapes let inductor prepack the convolution weights: faster at that size).
class Pt2Model : public Model {
 public:
  Pt2Model(const std::string& bytes, const std::string& label, const Artifact& artifact, const torch::Device& device) {
    PrivateCopy copy(bytes, label);
    dynamic_ = open(copy.path(), label, "model", device);
    for (const auto& [n, name] : artifact.static_batch_models) static_[n] = open(copy.path(), label, name, device);
  }
  torch::Tensor run(const torch::Tensor& images) override {
    auto it = static_.find(images.size(0));
    auto& loader = it == static_.end() ? dynamic_ : it->second;
    std::vector<torch::Tensor> out = loader->run({images});
    return out.at(0);
  }

 private:
  using Loader = torch::inductor::AOTIModelPackageLoader;
  static std::unique_ptr<Loader> open(const std::string& path, const std::string& label, const std::string& name,
                                      const torch::Device& device) {
    try {
      return std::make_unique<Loader>(path, name, false, 1,
                                      device.is_cuda() ? std::max<c10::DeviceIndex>(device.index(), 0) : -1);
    } catch (const std::exception& e) {
      throw BundleError(label + ": cannot load model '" + name + "' of the AOTInductor package (" +
                        std::string(e.what()).substr(0, 400) +
                        "); it must be compiled for this device and torch version, or use --format torchscript");
    }
  }
  std::unique_ptr<Loader> dynamic_;
  std::map<int64_t, std::unique_ptr<Loader>> static_;
};

}  // namespace

std::unique_ptr<Model> load_model(const std::string& bytes, const std::string& label, const Artifact& artifact,
                                  const torch::Device& device) {
  if (artifact.format == "torchscript") return std::make_unique<TorchScriptModel>(bytes, label, device);
  if (artifact.format == "aotinductor") return std::make_unique<Pt2Model>(bytes, label, artifact, device);
  throw OptionError("artifact '" + artifact.key + "' has format '" + artifact.format + "'; use pt2 or torchscript");
}

}  // namespace classify
