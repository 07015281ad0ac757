// Ed25519 signatures over manifest.json (python/export/signing.py is the Python twin; docs/BUNDLE.md,
// "Trust"). The signature is checked against the manifest bytes read_bundle parsed, never a second
// read of the file; keys are PEM SubjectPublicKeyInfo files ('python -m export keygen').
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "internal.h"

namespace classify {
namespace fs = std::filesystem;

namespace {

const char* kSignatureName = "signature.json";

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;

Key load_public_key(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw OptionError(path + ": cannot open the trusted key; pass the .pub file written by 'python -m export keygen'");
  Key key(PEM_read_PUBKEY(f, nullptr, nullptr, nullptr));
  std::fclose(f);
  if (!key || EVP_PKEY_id(key.get()) != EVP_PKEY_ED25519)
    throw OptionError(path + ": not a PEM Ed25519 public key; pass the .pub file written by 'python -m export keygen'");
  return key;
}

// First 16 hex digits of the sha256 of the raw 32-byte key (export.signing.key_id).
std::string key_id(EVP_PKEY* key) {
  std::array<unsigned char, 32> raw{};
  size_t len = raw.size();
  if (EVP_PKEY_get_raw_public_key(key, raw.data(), &len) != 1) return "?";
  return sha256_hex(std::string(reinterpret_cast<const char*>(raw.data()), len)).substr(0, 16);
}

bool verifies(EVP_PKEY* key, const std::string& sig, const std::string& data) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  bool ok = ctx && EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, key) == 1 &&
            EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                             reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1;
  EVP_MD_CTX_free(ctx);
  return ok;
}

// Standard base64 with padding, as Python's base64.b64encode writes it; throws on anything else.
std::string base64_decode(const std::string& in) {
  if (in.empty() || in.size() % 4 != 0 || in.find_first_not_of(
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=") != std::string::npos)
    throw std::invalid_argument("not base64");
  std::string out(in.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  if (n < 0) throw std::invalid_argument("not base64");
  size_t pad = in.size() - in.find_last_not_of('=') - 1;  // EVP_DecodeBlock keeps the padding's zero bytes
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

}  // namespace

std::string check_signature(const Bundle& b, const std::vector<std::string>& trusted_keys, bool require) {
  if (trusted_keys.empty() && !require) return "";
  if (trusted_keys.empty())
    throw OptionError("--require-signature needs at least one --trusted-key PUB (the .pub file written by "
                      "'python -m export keygen')");
  std::vector<Key> keys;
  for (const std::string& path : trusted_keys) keys.push_back(load_public_key(path));
  const std::string sig_path = (fs::path(b.dir) / kSignatureName).string();
  if (!fs::is_regular_file(sig_path)) {
    if (require)
      throw BundleError("[signature] " + b.dir + ": unsigned bundle (" + kSignatureName + " not found) and a signature is required; "
                        "sign it with 'python -m export sign BUNDLE --key PRIVATE_KEY' (or drop --require-signature)");
    return "";
  }
  nlohmann::json doc;
  std::string sig;
  try {
    std::ifstream in(sig_path, std::ios::binary);
    doc = nlohmann::json::parse(in);
    if (!doc.is_object() || doc.value("algorithm", "") != "ed25519" ||
        doc.value("signed_file", "manifest.json") != "manifest.json")
      throw std::invalid_argument("unknown algorithm or signed file");
    // the rest of bundle.signature.schema.json, as the Python reader checks it
    auto lower_hex = [](const nlohmann::json& v, size_t n) {
      if (!v.is_string() || v.get<std::string>().size() != n) return false;
      for (char c : v.get<std::string>())
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
      return true;
    };
    if (doc.contains("signature_version") && doc["signature_version"] != 1)
      throw std::invalid_argument("signature_version must be 1");
    if (doc.contains("manifest_sha256") && !lower_hex(doc["manifest_sha256"], 64))
      throw std::invalid_argument("manifest_sha256 must be 64 lowercase hex digits");
    if (doc.contains("key_id") && !lower_hex(doc["key_id"], 16))
      throw std::invalid_argument("key_id must be 16 lowercase hex digits");
    sig = base64_decode(doc.at("signature").get<std::string>());
    if (sig.size() != 64) throw std::invalid_argument("an Ed25519 signature has 64 bytes");
  } catch (const std::exception& e) {
    throw BundleError("[signature] " + sig_path + ": malformed signature file (" + e.what() + "); it was damaged or edited: copy "
                      "the bundle again or re-sign it with 'python -m export sign'");
  }
  std::string trusted;
  for (const Key& k : keys) {
    if (verifies(k.get(), sig, b.manifest_bytes)) return key_id(k.get());
    trusted += (trusted.empty() ? "" : ", ") + key_id(k.get());
  }
  const std::string claimed = doc.contains("key_id") && doc["key_id"].is_string() ? doc["key_id"].get<std::string>() : "";
  if (!claimed.empty() && trusted.find(claimed) != std::string::npos) {
    const bool changed = doc.value("manifest_sha256", "") != sha256_hex(b.manifest_bytes);
    throw BundleError("[signature] " + b.dir + ": signature check failed: " +
                      (changed ? "manifest.json was modified after signing" : "the signature was modified") +
                      "; do not load this bundle: copy it again from its publisher or re-sign it with "
                      "'python -m export sign'");
  }
  throw BundleError("[signature] " + b.dir + ": signed by key '" + claimed + "', which is not a trusted key (trusted: " + trusted +
                    "), or the manifest was modified; pass the publisher's public key with --trusted-key, or "
                    "re-sign the bundle with a trusted key");
}

}  // namespace classify
