// A minimal workbench-dump/1 writer in C++17, no dependencies: safetensors is 8 bytes of header length
// (little-endian u64), a JSON header, then the tensors' bytes back to back (docs/compare.md).
//
//   DumpWriter dump({1, 450, 7483, 29892}, /*n_prompt=*/3, "my-engine 0.1");
//   dump.add("0/blocks.0.attn_norm", {3, hidden}, attn_norm_rows);   // step 0: the prompt's rows
//   dump.add("1/blocks.0.attn_norm", {1, hidden}, attn_norm_row);    // step 1: one new token
//   dump.save("mine.safetensors");
//
// Build the demo: g++ -std=c++17 -O2 -DDUMP_DEMO write_dump.cpp -o write_dump && ./write_dump out.safetensors
#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

class DumpWriter {
 public:
  DumpWriter(std::vector<int64_t> tokens, int n_prompt, std::string engine = "")
      : tokens_(std::move(tokens)), n_prompt_(n_prompt), engine_(std::move(engine)) {}

  // Row-major values, rows first: [T, n_heads, head_dim], [T, hidden], ... (float32).
  void add(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values) {
    put(name, "F32", shape, values.data(), values.size() * sizeof(float));
  }
  // Expert ids (moe.topk_ids), [T, k].
  void add(const std::string& name, const std::vector<int64_t>& shape, const std::vector<int64_t>& ids) {
    put(name, "I64", shape, ids.data(), ids.size() * sizeof(int64_t));
  }

  void save(const std::string& path) const {
    std::string header = "{\"__metadata__\":{\"format\":\"workbench-dump/1\",\"tokens\":\"[";
    for (size_t i = 0; i < tokens_.size(); ++i) header += (i ? "," : "") + std::to_string(tokens_[i]);
    header += "]\",\"n_prompt\":\"" + std::to_string(n_prompt_) + "\"";
    if (!engine_.empty()) header += ",\"engine\":\"" + escaped(engine_) + "\"";
    header += "}";
    size_t offset = 0;
    for (const Entry& e : entries_) {
      header += ",\"" + escaped(e.name) + "\":{\"dtype\":\"" + e.dtype + "\",\"shape\":[";
      for (size_t i = 0; i < e.shape.size(); ++i) header += (i ? "," : "") + std::to_string(e.shape[i]);
      header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + e.bytes.size()) + "]}";
      offset += e.bytes.size();
    }
    header += "}";
    while (header.size() % 8) header += ' ';  // the tensors then start 8-byte aligned
    std::ofstream out(path, std::ios::binary);
    uint64_t n = header.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));  // little-endian
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const Entry& e : entries_) out.write(e.bytes.data(), static_cast<std::streamsize>(e.bytes.size()));
    if (!out) throw std::runtime_error("could not write " + path);
  }

 private:
  struct Entry {
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::vector<char> bytes;
  };

  void put(const std::string& name, const char* dtype, const std::vector<int64_t>& shape, const void* data, size_t n) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    if (static_cast<size_t>(count) * (dtype[1] == '6' ? 8 : 4) != n) throw std::invalid_argument(name + ": shape and data differ");
    Entry e{name, dtype, shape, std::vector<char>(n)};
    std::memcpy(e.bytes.data(), data, n);  // assumes a little-endian host, as safetensors does
    entries_.push_back(std::move(e));
  }

  static std::string escaped(const std::string& s) {
    std::string out;
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out;
  }

  std::vector<int64_t> tokens_;
  int n_prompt_;
  std::string engine_;
  std::vector<Entry> entries_;
};

#ifdef DUMP_DEMO
// Writes a dump whose numbers are a pure function of their position, which the test reads back.
int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const int64_t hidden = 8, k = 2;
  DumpWriter dump({1, 5, 9, 4}, 3, "c++ demo");
  std::vector<float> rows(3 * hidden), row(hidden);
  for (int64_t i = 0; i < 3 * hidden; ++i) rows[i] = 0.25f * static_cast<float>(i) - 1.0f;
  for (int64_t i = 0; i < hidden; ++i) row[i] = -0.5f * static_cast<float>(i);
  dump.add("0/blocks.0.attn_norm", {3, hidden}, rows);
  dump.add("1/blocks.0.resid_post", {1, hidden}, row);
  dump.add("1/blocks.0.moe.topk_ids", {1, k}, std::vector<int64_t>{3, 1});
  dump.save(argv[1]);
  return 0;
}
#endif
