// manifest.json reader (schema_version 1, docs/BUNDLE.md; python/export/manifest.py is the Python
// twin) and artifact checksums (OpenSSL's SHA-256). Every file is read once: the bytes whose sha256
// is checked are the bytes parsed or loaded, so a file swapped after its check is never used.
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <optional>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "internal.h"

namespace classify {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kSchemaVersion = 1;

// Categories as in python/export/manifest.py (docs/BUNDLE.md "Error categories"): a structure or type
// that bundle.schema.json refuses is "schema"; the semantic checks name their own.
[[noreturn]] void fail(const std::string& where, const std::string& what, const char* category = "schema") {
  throw BundleError("[" + std::string(category) + "] " + where + ": " + what);
}

const json& need(const json& obj, const char* key, const std::string& where) {
  if (!obj.is_object() || !obj.contains(key))
    fail(where, std::string("missing required key '") + key +
                    "'; the bundle is incomplete or was written by another tool; re-export it with 'python -m export'");
  return obj.at(key);
}

template <typename T>
T get(const json& obj, const char* key, const std::string& where) {
  const json& v = need(obj, key, where);
  try {
    return v.get<T>();
  } catch (const json::exception& e) {
    fail(where, std::string("key '") + key + "' has the wrong type (" + e.what() + ")");
  }
}

// python/export/bundle.schema.json is the source of truth; this reader has no JSON Schema library, so
// it mirrors the schema's key lists here (tests/conformance runs the same cases through both readers).
// Objects the schema closes (additionalProperties: false) refuse unknown keys, as Python does: a typo
// or a newer writer's key must not be silently ignored.
void keys_of(const json& obj, std::initializer_list<const char*> required, std::initializer_list<const char*> optional,
             const std::string& where) {
  if (!obj.is_object()) fail(where, "expected a JSON object, got " + std::string(obj.type_name()));
  for (const char* k : required) need(obj, k, where);
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool known = false;
    for (auto list : {required, optional})
      for (const char* k : list) known = known || it.key() == k;
    if (!known)
      fail(where, "unknown key '" + it.key() + "' (bundle.schema.json, docs/BUNDLE.md); the manifest was edited by "
                  "hand or written by a newer tool: re-export it with 'python -m export'");
  }
}

// An ensemble member's folder: a relative path inside the ensemble bundle (export.manifest.member_path_ok
// is the same rule). An absolute path or one with '..' would read outside it, and '.' or '' is the
// ensemble itself: read_bundle would recurse until the stack overflows.
bool member_path_ok(const std::string& p) {
  if (p.find('\\') != std::string::npos) return false;
  const fs::path path(p);
  if (path.is_absolute()) return false;
  bool named = false;
  for (const fs::path& part : path) {
    const std::string s = part.string();
    if (s == "..") return false;
    if (!s.empty() && s != ".") named = true;
  }
  return named;
}

// An artifact file or data file: a plain file name in the bundle folder (export.manifest.plain_name_ok).
bool plain_name_ok(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos;
}

bool sha256_ok(const json& v) {
  if (!v.is_string() || v.get<std::string>().size() != 64) return false;
  return v.get<std::string>().find_first_not_of("0123456789abcdef") == std::string::npos;
}

std::vector<View> parse_views(const json& tta, const std::string& where) {
  keys_of(tta, {"default", "merge", "views"}, {}, where + ": tta");
  const json& views = need(tta, "views", where);
  if (!views.is_array() || views.empty()) fail(where, "'tta.views' must be a non-empty list");
  std::vector<View> out;
  for (const json& v : views) {
    keys_of(v, {}, {"resize", "crop", "flip"}, where + ": tta.views[]");
    View view;
    if (v.contains("resize") && !v["resize"].is_null()) view.resize = get<int>(v, "resize", where);
    if (v.contains("crop")) view.crop = get<std::string>(v, "crop", where);
    if (v.contains("flip")) view.flip = get<std::string>(v, "flip", where);
    out.push_back(view);
  }
  return out;
}

}  // namespace

namespace {

std::string finish_hex(EVP_MD_CTX* ctx) {
  std::array<unsigned char, 32> digest{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest.data(), &len);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  char b[3];
  for (unsigned i = 0; i < len; ++i) {
    std::snprintf(b, sizeof b, "%02x", digest[i]);
    hex += b;
  }
  return hex;
}

// The whole file, or an empty optional when it cannot be opened.
std::optional<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

}  // namespace

std::string sha256_hex(const std::string& data) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx, data.data(), data.size());
  return finish_hex(ctx);
}

std::string file_sha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open to compute its sha256");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  return finish_hex(ctx);
}

const Artifact* Bundle::artifact(const std::string& key) const {
  for (const Artifact& a : artifacts)
    if (a.key == key) return &a;
  return nullptr;
}

const Artifact* Bundle::find(const std::string& family, const std::string& device,
                             const std::string& precision) const {
  const std::string format = family == "pt2" ? "aotinductor" : family;
  for (const Artifact& a : artifacts)
    if (a.format == format && a.device == device && a.precision == precision) return &a;
  return nullptr;
}

// The bytes of a bundle's manifest.json; nullopt when it is not a readable regular file (never throws:
// a symlink loop is just "not a bundle").
static std::optional<std::string> manifest_bytes(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  return read_file(path);
}

static Bundle parse_bundle(const fs::path& dir, std::string bytes);

Bundle read_bundle(const std::string& dir_in) {
  fs::path dir(dir_in);
  std::error_code ec;
  if (dir.filename() == "manifest.json" && fs::is_regular_file(dir, ec)) dir = dir.parent_path();
  std::optional<std::string> raw = manifest_bytes((dir / "manifest.json").string());
  if (!raw)
    throw BundleError("'" + dir_in + "' is not a bundle: " + (dir / "manifest.json").string() +
                      " not found (build one with 'python -m export --checkpoint RUN/best.pt --out DIR')");
  return parse_bundle(dir, std::move(*raw));
}

// Parse and check a manifest from the bytes read once (what is hashed is what is parsed).
static Bundle parse_bundle(const fs::path& dir, std::string bytes) {
  Bundle b;
  b.dir = dir.string();
  b.manifest_path = (dir / "manifest.json").string();
  const std::string& where = b.manifest_path;
  b.manifest_bytes = std::move(bytes);
  json m;
  try {
    m = json::parse(b.manifest_bytes);
  } catch (const json::exception& e) {
    fail(where, std::string("not valid JSON (") + e.what() + "); the file is corrupt, re-export the bundle");
  }
  if (!m.is_object()) fail(where, "expected a JSON object at the top level");
  if (!m.contains("schema_version") || m["schema_version"] != kSchemaVersion)
    fail(where, "unknown schema_version " + (m.contains("schema_version") ? m["schema_version"].dump() : "(none)") +
                    "; this reader understands version 1; re-export the bundle with this version of "
                    "'python -m export' (or upgrade the native runtime)");
  b.kind = get<std::string>(m, "kind", where);
  if (b.kind != "model" && b.kind != "ensemble") fail(where, "kind must be 'model' or 'ensemble', got '" + b.kind + "'");
  if (b.kind == "model")
    keys_of(m, {"schema_version", "kind", "name", "version", "architecture", "classes", "preprocessing", "input", "output",
                "max_batch", "tta", "artifacts", "provenance"}, {"metrics"}, where);
  else
    keys_of(m, {"schema_version", "kind", "name", "version", "classes", "fusion", "members", "tta", "provenance"}, {},
            where);
  b.name = get<std::string>(m, "name", where);
  get<std::string>(m, "version", where);
  if (!m.at("provenance").is_object()) fail(where, "'provenance' must be a JSON object");
  b.classes = get<std::vector<std::string>>(m, "classes", where);
  if (b.classes.size() < 2) fail(where, "'classes' must be a list of at least two class names");
  if (std::set<std::string>(b.classes.begin(), b.classes.end()).size() != b.classes.size())
    fail(where, "'classes' has duplicates");
  const json& tta = need(m, "tta", where);
  if (tta.contains("default")) b.tta_default = get<std::string>(tta, "default", where);
  b.tta_merge = get<std::string>(tta, "merge", where);
  if (b.tta_merge != "mean" && b.tta_merge != "max" && b.tta_merge != "vote")
    fail(where, "tta.merge must be mean, max or vote, got '" + b.tta_merge + "'");
  b.tta_views = parse_views(tta, where);

  if (b.kind == "ensemble") {
    b.fusion = get<std::string>(m, "fusion", where);
    if (b.fusion != "mean" && b.fusion != "weighted" && b.fusion != "vote")
      fail(where, "unknown fusion '" + b.fusion + "'; use mean, weighted or vote");
    const json& members = need(m, "members", where);
    if (!members.is_array() || members.empty()) fail(where, "an ensemble needs at least one member");
    for (const json& mem : members) {
      keys_of(mem, {"name", "path", "weight", "manifest_sha256"}, {}, where + ": members[]");
      Member member;
      member.name = get<std::string>(mem, "name", where);
      if (!need(mem, "weight", where).is_number() || !(get<double>(mem, "weight", where) >= 0) ||
          std::isinf(get<double>(mem, "weight", where)))
        fail(where, "member weight must be a non-negative number");
      member.weight = get<double>(mem, "weight", where);
      const std::string rel = get<std::string>(mem, "path", where);
      if (!member_path_ok(rel))
        fail(where, "member path must be a relative folder inside the ensemble bundle (not absolute, no '..', "
                    "not the bundle itself), got '" + rel + "'; rebuild it with 'python -m export ensemble'", "path");
      // Required: the ensemble's manifest pins each member's manifest, which pins its artifacts.
      if (!sha256_ok(need(mem, "manifest_sha256", where)))
        fail(where, "member manifest_sha256 must be 64 lowercase hex digits; rebuild it with 'python -m export ensemble'");
      std::string sub = (dir / rel).string();
      std::string sub_manifest = sub + "/manifest.json";
      std::optional<std::string> sub_bytes = manifest_bytes(sub_manifest);
      if (!sub_bytes)
        fail(sub_manifest, "missing; the ensemble is incomplete: copy it again or rebuild it with "
                           "'python -m export ensemble'", "integrity");
      // checked before parsing (a member that is the ensemble itself stops here), on the bytes then parsed
      if (sha256_hex(*sub_bytes) != mem["manifest_sha256"].get<std::string>())
        fail(sub_manifest, "sha256 differs from the ensemble manifest's; the member was modified: "
                           "rebuild the ensemble with 'python -m export ensemble'", "integrity");
      member.bundle = parse_bundle(sub, std::move(*sub_bytes));
      if (member.bundle.kind != "model")
        fail(member.bundle.manifest_path, "an ensemble member is itself an ensemble; nested ensembles "
                                          "are not supported: list the inner ensemble's members in the outer one");
      if (member.bundle.classes != b.classes)
        fail(member.bundle.manifest_path, "member '" + member.name + "' has different classes from the ensemble; "
                                          "ensemble only models trained on the same classes", "classes");
      b.members.push_back(std::move(member));
    }
    return b;
  }

  const json& pre = need(m, "preprocessing", where);
  keys_of(pre, {"crop_size", "resize_size", "resize_policy", "crop", "interpolation", "mean", "std", "channel_order",
                "input_dtype", "layout"},
          {"resize_kernel", "alpha", "exif_orientation", "sixteen_bit", "normalize_in_graph", "extra"},
          where + ": preprocessing");
  keys_of(m.at("input"), {"name", "dtype", "shape"}, {}, where + ": input");
  keys_of(m.at("output"), {"name", "dtype", "shape"}, {"kind"}, where + ": output");
  auto crop = get<std::vector<int>>(pre, "crop_size", where);
  if (crop.size() != 2 || crop[0] <= 0 || crop[1] <= 0) fail(where, "preprocessing.crop_size must be [height, width]");
  b.pre.crop_h = crop[0];
  b.pre.crop_w = crop[1];
  b.pre.resize_size = get<int>(pre, "resize_size", where);
  b.pre.interpolation = get<std::string>(pre, "interpolation", where);
  if (pre.contains("resize_kernel")) b.pre.resize_kernel = get<std::string>(pre, "resize_kernel", where);
  if (b.pre.resize_kernel != "uint8" && b.pre.resize_kernel != "float32")
    fail(where, "preprocessing.resize_kernel '" + b.pre.resize_kernel + "' is not supported; use uint8 or float32");
  b.pre.mean = get<std::vector<double>>(pre, "mean", where);
  b.pre.std = get<std::vector<double>>(pre, "std", where);
  // Only the policies this runtime implements; anything else is refused rather than guessed.
  auto expect = [&](const char* key, const std::string& want) {
    if (pre.contains(key) && pre[key] != want)
      fail(where, std::string("preprocessing.") + key + " is " + pre[key].dump() + "; the native runtime supports only '" +
                      want + "'");
  };
  expect("resize_policy", "shorter_side");
  expect("crop", "center");
  expect("channel_order", "RGB");
  expect("input_dtype", "uint8");
  expect("layout", "NCHW");
  expect("alpha", "drop");
  expect("sixteen_bit", "round(v/257)");
  if (b.pre.interpolation != "bilinear" && b.pre.interpolation != "bicubic")
    fail(where, "preprocessing.interpolation '" + b.pre.interpolation + "' is not supported; use bilinear or bicubic");
  if (b.pre.resize_size < std::min(b.pre.crop_h, b.pre.crop_w))
    fail(where, "preprocessing.resize_size is smaller than crop_size");
  // The model's output width is its class count; a shorter class list would index past it.
  const json& out_shape = need(need(m, "output", where), "shape", where + ": output");
  if (!out_shape.is_array() || out_shape.size() != 2 || !out_shape[1].is_number_integer())
    fail(where, "output.shape must be [-1, K]");
  if (out_shape[1].get<int64_t>() != static_cast<int64_t>(b.classes.size()))
    fail(where, "output shape " + out_shape.dump() + " does not match " + std::to_string(b.classes.size()) +
                    " classes; the class list does not belong to this model: re-export the bundle", "classes");
  b.max_batch = get<int>(m, "max_batch", where);
  if (b.max_batch < 1) fail(where, "max_batch must be a positive integer");
  const json& arts = need(m, "artifacts", where);
  if (!arts.is_object() || arts.empty()) fail(where, "no artifacts listed");
  for (auto it = arts.begin(); it != arts.end(); ++it) {
    std::string w = where + ": artifacts." + it.key();
    Artifact a;  // by name, not aggregate order: a brace list would silently fill the newer fields
    a.key = it.key();
    a.file = get<std::string>(*it, "file", w);
    a.format = get<std::string>(*it, "format", w);
    a.sha256 = get<std::string>(*it, "sha256", w);
    if (!plain_name_ok(a.file)) fail(w, "file must be a plain file name in the bundle folder, got '" + a.file + "'", "path");
    if (!sha256_ok((*it)["sha256"])) fail(w, "sha256 must be 64 lowercase hex digits");
    if (it->contains("data_files")) {
      for (const std::string& d : get<std::vector<std::string>>(*it, "data_files", w))
        if (!plain_name_ok(d))
          fail(w, "data_files must be plain file names in the bundle folder (no '/', no '..'), got '" + d + "'", "path");
    }
    // Bundles written before CUDA artifacts existed have neither field: CPU, fp32.
    if (it->contains("device")) a.device = get<std::string>(*it, "device", w);
    if (a.device != "cpu" && a.device != "cuda") fail(w, "device must be 'cpu' or 'cuda', got '" + a.device + "'");
    if (it->contains("precision")) a.precision = get<std::string>(*it, "precision", w);
    if (a.precision != "fp32" && a.precision != "fp16" && a.precision != "bf16")
      fail(w, "precision must be fp32, fp16 or bf16, got '" + a.precision + "'");
    if (it->contains("static_batch_models")) {
      const json& sm = (*it)["static_batch_models"];
      if (!sm.is_object()) fail(w, "static_batch_models must map batch sizes to model names");
      for (auto s = sm.begin(); s != sm.end(); ++s) {
        int64_t n = 0;
        try {
          n = std::stoll(s.key());
        } catch (const std::exception&) {
          fail(w, "static_batch_models key '" + s.key() + "' is not a batch size");
        }
        if (n < 1 || !s->is_string()) fail(w, "static_batch_models must map batch sizes >= 1 to model names");
        a.static_batch_models[n] = s->get<std::string>();
      }
    }
    if (a.format == "aotinductor" && a.device == "cpu" && it->contains("compiled_for")) {
      const json& cf = (*it)["compiled_for"];
      const std::string wc = w + ".compiled_for";
      if (!cf.is_object()) fail(wc, "must be an object");
      if (cf.contains("cpu_isa")) {
        a.cpu_isa = get<std::string>(cf, "cpu_isa", wc);
        a.cpu_features = get<std::vector<std::string>>(cf, "cpu_features", wc);
        if (cf.contains("march")) a.march = get<std::string>(cf, "march", wc);
        if (cf.contains("machine")) a.machine = get<std::string>(cf, "machine", wc);
        if (cf.contains("torch")) a.torch_version = get<std::string>(cf, "torch", wc);
      }
    }
    b.artifacts.push_back(a);
  }
  return b;
}

std::string read_checked_artifact(const Bundle& b, const std::string& key) {
  const Artifact* a = b.artifact(key);
  if (!a) {
    std::string have;
    for (const Artifact& x : b.artifacts) have += (have.empty() ? "" : ", ") + x.key;
    throw BundleError(b.dir + ": the bundle has no '" + key + "' artifact (it has: " + have +
                      "); re-export with --format " + key + " or pick another --format");
  }
  std::string path = (fs::path(b.dir) / a->file).string();
  std::optional<std::string> bytes = fs::is_regular_file(path) ? read_file(path) : std::nullopt;
  if (!bytes)
    throw BundleError("[integrity] " + path + ": missing; the bundle is incomplete, copy it again or re-export it");
  std::string got = sha256_hex(*bytes);
  if (got != a->sha256)
    throw BundleError("[integrity] " + path + ": sha256 " + got.substr(0, 16) + "... differs from the manifest's " +
                      a->sha256.substr(0, std::min<size_t>(16, a->sha256.size())) +
                      "...; the file was modified or corrupted: copy the bundle again or re-export it");
  return std::move(*bytes);
}

}  // namespace classify
