// The two artifact formats the native runtime runs: TorchScript (torch::jit::load) and
// AOTInductor packages (.pt2, AOTIModelPackageLoader). Both take (N, 3, H, W) uint8 and return
// (N, K) float32 probabilities: normalisation and softmax are folded into the graph.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include "internal.h"

namespace classify {
namespace {

class TorchScriptModel : public Model {
 public:
  TorchScriptModel(const std::string& path, const torch::Device& device) {
    try {
      module_ = torch::jit::load(path, device);
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
  Pt2Model(const std::string& path, const Artifact& artifact, const torch::Device& device) {
    dynamic_ = open(path, "model", device);
    for (const auto& [n, name] : artifact.static_batch_models) static_[n] = open(path, name, device);
  }
  torch::Tensor run(const torch::Tensor& images) override {
    auto it = static_.find(images.size(0));
    auto& loader = it == static_.end() ? dynamic_ : it->second;
    std::vector<torch::Tensor> out = loader->run({images});
    return out.at(0);
  }

 private:
  using Loader = torch::inductor::AOTIModelPackageLoader;
  static std::unique_ptr<Loader> open(const std::string& path, const std::string& name, const torch::Device& device) {
    try {
      return std::make_unique<Loader>(path, name, false, 1,
                                      device.is_cuda() ? std::max<c10::DeviceIndex>(device.index(), 0) : -1);
    } catch (const std::exception& e) {
      throw BundleError(path + ": cannot load model '" + name + "' of the AOTInductor package (" +
                        std::string(e.what()).substr(0, 400) +
                        "); it must be compiled for this device and torch version, or use --format torchscript");
    }
  }
  std::unique_ptr<Loader> dynamic_;
  std::map<int64_t, std::unique_ptr<Loader>> static_;
};

}  // namespace

std::unique_ptr<Model> load_model(const std::string& path, const Artifact& artifact, const torch::Device& device) {
  if (artifact.format == "torchscript") return std::make_unique<TorchScriptModel>(path, device);
  if (artifact.format == "aotinductor") return std::make_unique<Pt2Model>(path, artifact, device);
  throw OptionError("artifact '" + artifact.key + "' has format '" + artifact.format + "'; use pt2 or torchscript");
}

}  // namespace classify
