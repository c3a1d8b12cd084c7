// The four tokenizer models of tokenizers' models/: BPE, WordPiece, Unigram, WordLevel.
#include <algorithm>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "core/tokenizer/components.hpp"
#include "core/tokenizer/unicode.hpp"

namespace tpe::tokenizer::detail {

namespace u = unicode;

namespace {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};

using VocabMap = std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>>;

uint32_t parse_id(const json& value, const Where& where) {
  if (!value.is_number_unsigned() ||
      value.get<uint64_t>() >= std::numeric_limits<uint32_t>::max()) {
    where.fail("expected a token id, got {}", value.dump());
  }
  return value.get<uint32_t>();
}

// A {token: id} vocabulary, both ways.
class Vocab {
 public:
  void load(const json& config, const Where& where) {
    const json& vocab = member(config, "vocab", where);
    if (!vocab.is_object()) where.at("vocab").fail("expected an object of token: id");
    map_.reserve(vocab.size());
    for (const auto& [token, value] : vocab.items()) {
      const uint32_t id = parse_id(value, where.at("vocab").at(token));
      map_[token] = id;
      if (id >= tokens_.size()) tokens_.resize(static_cast<size_t>(id) + 1);
      tokens_[id] = token;
    }
  }
  std::optional<uint32_t> find(std::string_view token) const {
    const auto it = map_.find(token);
    return it == map_.end() ? std::nullopt : std::optional<uint32_t>(it->second);
  }
  const std::string* token(uint32_t id) const {
    return id < tokens_.size() && tokens_[id] ? &*tokens_[id] : nullptr;
  }
  size_t size() const { return tokens_.size(); }

 private:
  VocabMap map_;
  std::vector<std::optional<std::string>> tokens_;
};

std::optional<std::string> optional_string(const json& config, const char* key,
                                           const Where& where) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  return get_string(config, key, where);
}

// ---------------------------------------------------------------------------------------------

class Bpe final : public Model {
 public:
  Bpe(const json& config, const Where& where) : file_(where.file) {
    vocab_.load(config, where);
    unk_token_ = optional_string(config, "unk_token", where);
    prefix_ = optional_string(config, "continuing_subword_prefix", where);
    suffix_ = optional_string(config, "end_of_word_suffix", where);
    fuse_unk_ = get_bool(config, "fuse_unk", false, where);
    byte_fallback_ = get_bool(config, "byte_fallback", false, where);
    ignore_merges_ = get_bool(config, "ignore_merges", false, where);
    if (config.contains("dropout") && !config["dropout"].is_null()) {
      // Dropout makes encoding random; a checkpoint for inference has none.
      where.at("dropout").fail("BPE dropout is not supported (it makes encoding random)");
    }
    if (byte_fallback_) {
      for (int b = 0; b < 256; ++b) byte_ids_[b] = vocab_.find(fmt::format("<0x{:02X}>", b));
    }
    const json& merges = member(config, "merges", where);
    if (!merges.is_array()) where.at("merges").fail("expected a list");
    merges_.reserve(merges.size());
    const size_t prefix_len = prefix_ ? prefix_->size() : 0;
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const Where at = where.at("merges").at(rank);
      const json& merge = merges[rank];
      std::string a;
      std::string b;
      if (merge.is_string()) {
        const std::string line = merge.get<std::string>();
        const size_t space = line.find(' ');
        if (space == std::string::npos) at.fail("expected \"a b\", got '{}'", printable(line));
        a = line.substr(0, space);
        b = line.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        a = merge[0].get<std::string>();
        b = merge[1].get<std::string>();
      } else {
        at.fail("expected \"a b\" or [\"a\", \"b\"], got {}", merge.type_name());
      }
      const auto a_id = vocab_.find(a);
      const auto b_id = vocab_.find(b);
      if (!a_id) at.fail("'{}' is not in the vocabulary", printable(a));
      if (!b_id) at.fail("'{}' is not in the vocabulary", printable(b));
      if (b.size() < prefix_len || (prefix_len > 0 && !b.starts_with(*prefix_))) {
        at.fail("'{}' does not start with the continuing_subword_prefix", printable(b));
      }
      const std::string merged = a + b.substr(prefix_len);
      const auto new_id = vocab_.find(merged);
      if (!new_id) at.fail("merged token '{}' is not in the vocabulary", printable(merged));
      merges_[key(*a_id, *b_id)] = {static_cast<uint32_t>(rank), *new_id};
    }
  }

  void tokenize(std::string_view word, std::vector<uint32_t>& ids) const override {
    if (word.empty()) return;
    if (ignore_merges_) {
      if (const auto id = vocab_.find(word)) {
        ids.push_back(*id);
        return;
      }
    }
    const bool cacheable = word.size() < max_cached_length;
    if (cacheable) {
      const std::lock_guard lock(cache_mutex_);
      const auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    const size_t first = ids.size();
    merge_word(word, ids);
    if (!cacheable) return;
    const std::lock_guard lock(cache_mutex_);
    // Bounded, never evicting (as tokenizers' cache): a long text cannot grow it without end.
    if (cache_.size() < cache_capacity)
      cache_.emplace(word, std::vector<uint32_t>(ids.begin() + first, ids.end()));
  }

  std::optional<uint32_t> token_to_id(std::string_view token) const override {
    return vocab_.find(token);
  }
  const std::string* id_to_token(uint32_t id) const override { return vocab_.token(id); }
  size_t vocab_size() const override { return vocab_.size(); }

 private:
  // tokenizers' limits: 10,000 words, each shorter than 256 bytes.
  static constexpr size_t cache_capacity = 10000;
  static constexpr size_t max_cached_length = 256;
  static uint64_t key(uint32_t a, uint32_t b) { return static_cast<uint64_t>(a) << 32 | b; }

  struct Symbol {
    uint32_t id;
    int prev;
    int next;
    bool removed;
  };

  static void add_unk(std::vector<Symbol>& symbols, int64_t& pending) {
    if (pending >= 0) symbols.push_back({static_cast<uint32_t>(pending), 0, 0, false});
    pending = -1;
  }

  void merge_word(std::string_view word, std::vector<uint32_t>& ids) const {
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    int64_t unk = -1;  // an unknown run waiting to be added (fuse_unk joins them), or -1
    std::optional<uint32_t> unk_id;
    if (unk_token_) unk_id = vocab_.find(*unk_token_);
    std::string piece;
    size_t pos = 0;
    while (pos < word.size()) {
      const size_t start = pos;
      u::next(word, pos);
      std::string_view s = word.substr(start, pos - start);
      if ((start != 0 && prefix_) || (pos == word.size() && suffix_)) {
        piece.clear();
        if (start != 0 && prefix_) piece += *prefix_;
        piece += s;
        if (pos == word.size() && suffix_) piece += *suffix_;
        s = piece;
      }
      if (const auto id = vocab_.find(s)) {
        add_unk(symbols, unk);
        symbols.push_back({*id, 0, 0, false});
        continue;
      }
      if (byte_fallback_ && std::all_of(s.begin(), s.end(), [&](char c) {
            return byte_ids_[static_cast<unsigned char>(c)].has_value();
          })) {
        // tokenizers does not add a pending unknown before byte tokens; neither do we.
        for (const char c : s)
          symbols.push_back({*byte_ids_[static_cast<unsigned char>(c)], 0, 0, false});
        continue;
      }
      if (unk_token_) {
        if (!unk_id)
          fail("{}: model: unk_token '{}' is not in the vocabulary", file_, printable(*unk_token_));
        if (unk >= 0 && !fuse_unk_) add_unk(symbols, unk);
        unk = *unk_id;
      }
    }
    add_unk(symbols, unk);
    merge_all(symbols);
    for (const Symbol& symbol : symbols) {
      if (!symbol.removed) ids.push_back(symbol.id);
    }
  }

  void merge_all(std::vector<Symbol>& symbols) const {
    const int n = static_cast<int>(symbols.size());
    for (int i = 0; i < n; ++i) {
      symbols[i].prev = i - 1;
      symbols[i].next = i + 1 < n ? i + 1 : -1;
    }
    struct Candidate {
      uint32_t rank;
      int pos;
      uint32_t new_id;
      // Lowest rank first, then leftmost.
      bool operator<(const Candidate& other) const {
        return rank != other.rank ? rank > other.rank : pos > other.pos;
      }
    };
    auto lookup = [&](uint32_t a, uint32_t b) -> const std::pair<uint32_t, uint32_t>* {
      const auto it = merges_.find(key(a, b));
      return it == merges_.end() ? nullptr : &it->second;
    };
    // A heap in a reserved vector (push_heap/pop_heap): a priority_queue built around one made
    // GCC 13 warn falsely (-Waggressive-loop-optimizations) in its make_heap.
    std::vector<Candidate> queue;
    queue.reserve(symbols.size());
    const auto push = [&queue](Candidate c) {
      queue.push_back(c);
      std::push_heap(queue.begin(), queue.end());
    };
    for (int i = 0; i + 1 < n; ++i) {
      if (const auto* m = lookup(symbols[i].id, symbols[i + 1].id)) push({m->first, i, m->second});
    }
    while (!queue.empty()) {
      std::pop_heap(queue.begin(), queue.end());
      const Candidate top = queue.back();
      queue.pop_back();
      Symbol& current = symbols[top.pos];
      if (current.removed || current.next < 0) continue;
      const int next_pos = current.next;
      const Symbol right = symbols[next_pos];
      // Skip a stale entry: the pair at this position changed since it was queued.
      const auto* m = lookup(current.id, right.id);
      if (m == nullptr || m->second != top.new_id) continue;
      current.id = top.new_id;
      current.next = right.next;
      symbols[next_pos].removed = true;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (current.prev >= 0) {
        if (const auto* p = lookup(symbols[current.prev].id, current.id))
          push({p->first, current.prev, p->second});
      }
      if (current.next >= 0) {
        if (const auto* p = lookup(current.id, symbols[current.next].id))
          push({p->first, top.pos, p->second});
      }
    }
  }

  std::string file_;
  Vocab vocab_;
  std::unordered_map<uint64_t, std::pair<uint32_t, uint32_t>> merges_;  // pair -> (rank, new id)
  std::optional<std::string> unk_token_;
  std::optional<std::string> prefix_;
  std::optional<std::string> suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::optional<uint32_t> byte_ids_[256];
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<uint32_t>, StringHash, std::equal_to<>>
      cache_;
};

// ---------------------------------------------------------------------------------------------

class WordPiece final : public Model {
 public:
  WordPiece(const json& config, const Where& where) : file_(where.file) {
    vocab_.load(config, where);
    unk_token_ = get_string(config, "unk_token", where);
    prefix_ = config.contains("continuing_subword_prefix")
                  ? get_string(config, "continuing_subword_prefix", where)
                  : "##";
    max_chars_ = config.contains("max_input_chars_per_word")
                     ? get_uint(config, "max_input_chars_per_word", where)
                     : 100;
  }

  void tokenize(std::string_view word, std::vector<uint32_t>& ids) const override {
    size_t chars = 0;
    for (size_t pos = 0; pos < word.size();
         pos += u::sequence_length(static_cast<unsigned char>(word[pos])))
      ++chars;
    if (chars > max_chars_) {
      ids.push_back(unk());
      return;
    }
    const size_t first = ids.size();
    std::string candidate;
    size_t start = 0;
    while (start < word.size()) {
      size_t end = word.size();
      std::optional<uint32_t> found;
      while (start < end) {
        std::string_view sub = word.substr(start, end - start);
        if (start > 0) {
          candidate.assign(prefix_);
          candidate += sub;
          sub = candidate;
        }
        if ((found = vocab_.find(sub))) break;
        // Drop the last character.
        --end;
        while (end > start && (static_cast<unsigned char>(word[end]) & 0xc0) == 0x80) --end;
      }
      if (!found) {
        ids.resize(first);
        ids.push_back(unk());
        return;
      }
      ids.push_back(*found);
      start = end;
    }
  }

  std::optional<uint32_t> token_to_id(std::string_view token) const override {
    return vocab_.find(token);
  }
  const std::string* id_to_token(uint32_t id) const override { return vocab_.token(id); }
  size_t vocab_size() const override { return vocab_.size(); }

 private:
  uint32_t unk() const {
    const auto id = vocab_.find(unk_token_);
    if (!id)
      fail("{}: model: unk_token '{}' is not in the vocabulary", file_, printable(unk_token_));
    return *id;
  }

  std::string file_;
  Vocab vocab_;
  std::string unk_token_;
  std::string prefix_;
  uint64_t max_chars_ = 100;
};

// ---------------------------------------------------------------------------------------------

class WordLevel final : public Model {
 public:
  WordLevel(const json& config, const Where& where) : file_(where.file) {
    vocab_.load(config, where);
    unk_token_ = optional_string(config, "unk_token", where);
  }

  void tokenize(std::string_view word, std::vector<uint32_t>& ids) const override {
    if (const auto id = vocab_.find(word)) {
      ids.push_back(*id);
      return;
    }
    const auto unk = unk_token_ ? vocab_.find(*unk_token_) : std::nullopt;
    if (!unk)
      fail("{}: model: '{}' is not in the vocabulary and there is no unk_token", file_,
           printable(word));
    ids.push_back(*unk);
  }

  std::optional<uint32_t> token_to_id(std::string_view token) const override {
    return vocab_.find(token);
  }
  const std::string* id_to_token(uint32_t id) const override { return vocab_.token(id); }
  size_t vocab_size() const override { return vocab_.size(); }

 private:
  std::string file_;
  Vocab vocab_;
  std::optional<std::string> unk_token_;
};

// ---------------------------------------------------------------------------------------------

class Unigram final : public Model {
 public:
  Unigram(const json& config, const Where& where) : file_(where.file) {
    const json& vocab = member(config, "vocab", where);
    if (!vocab.is_array() || vocab.empty())
      where.at("vocab").fail("expected a non-empty list of [piece, score]");
    pieces_.reserve(vocab.size());
    scores_.reserve(vocab.size());
    min_score_ = std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < vocab.size(); ++i) {
      const json& entry = vocab[i];
      if (!entry.is_array() || entry.size() != 2 || !entry[0].is_string() ||
          !entry[1].is_number()) {
        where.at("vocab").at(i).fail("expected [piece, score]");
      }
      pieces_.push_back(entry[0].get<std::string>());
      scores_.push_back(entry[1].get<double>());
      min_score_ = std::min(min_score_, scores_.back());
      const auto id = static_cast<uint32_t>(i);
      const std::string& piece = pieces_.back();
      ids_[piece] = id;
      max_piece_ = std::max(max_piece_, piece.size());
      for (size_t len = 1; len < piece.size(); ++len) prefixes_.emplace(piece.substr(0, len), 0);
    }
    if (config.contains("unk_id") && !config["unk_id"].is_null()) {
      unk_id_ = parse_id(config["unk_id"], where.at("unk_id"));
      if (*unk_id_ >= pieces_.size())
        where.at("unk_id").fail("{} is past the vocabulary ({})", *unk_id_, pieces_.size());
    }
    byte_fallback_ = get_bool(config, "byte_fallback", false, where);
  }

  void tokenize(std::string_view word, std::vector<uint32_t>& ids) const override {
    if (word.empty()) return;
    thread_local std::vector<std::string_view> pieces;
    encode(word, pieces);
    for (const std::string_view piece : pieces) {
      if (const auto it = ids_.find(piece); it != ids_.end()) {
        ids.push_back(it->second);
        continue;
      }
      if (byte_fallback_) {
        thread_local std::vector<uint32_t> bytes;
        bytes.clear();
        for (const char c : piece) {
          const auto it = ids_.find(fmt::format("<0x{:02X}>", static_cast<unsigned char>(c)));
          if (it == ids_.end()) break;
          bytes.push_back(it->second);
        }
        if (bytes.size() == piece.size()) {
          ids.insert(ids.end(), bytes.begin(), bytes.end());
          continue;
        }
      }
      ids.push_back(unk());
    }
  }

  std::optional<uint32_t> token_to_id(std::string_view token) const override {
    const auto it = ids_.find(token);
    return it == ids_.end() ? std::nullopt : std::optional<uint32_t>(it->second);
  }
  const std::string* id_to_token(uint32_t id) const override {
    return id < pieces_.size() ? &pieces_[id] : nullptr;
  }
  size_t vocab_size() const override { return pieces_.size(); }

 private:
  // SentencePiece's unknown-piece penalty (unigram_model.cc kUnkPenalty).
  static constexpr double unk_penalty = 10.0;

  uint32_t unk() const {
    if (!unk_id_)
      fail("{}: model: text needs an unknown piece but the Unigram model has no unk_id", file_);
    return *unk_id_;
  }

  // Viterbi best path (tokenizers' encode_optimized), as pieces of `text`; adjacent unknown
  // pieces are fused.
  void encode(std::string_view text, std::vector<std::string_view>& out) const {
    struct Node {
      uint32_t id = 0;
      double score = 0;
      size_t start = std::string_view::npos;
    };
    thread_local std::vector<Node> best;
    best.assign(text.size() + 1, Node{});
    const double unk_score = min_score_ - unk_penalty;
    size_t start = 0;
    while (start < text.size()) {
      const double base = best[start].score;
      const size_t char_len = u::sequence_length(static_cast<unsigned char>(text[start]));
      bool single = false;
      const size_t max_len = std::min(max_piece_, text.size() - start);
      for (size_t len = 1; len <= max_len; ++len) {
        const std::string_view candidate = text.substr(start, len);
        const auto it = ids_.find(candidate);
        if (it != ids_.end()) {
          Node& target = best[start + len];
          const double score = base + scores_[it->second];
          if (target.start == std::string_view::npos || score > target.score)
            target = {it->second, score, start};
          if (len == char_len) single = true;
        }
        if (prefixes_.find(candidate) == prefixes_.end()) break;
      }
      if (!single) {
        Node& target = best[start + char_len];
        const double score = base + unk_score;
        if (target.start == std::string_view::npos || score > target.score)
          target = {unk(), score, start};
      }
      start += char_len;
    }
    out.clear();
    size_t end = text.size();
    size_t unk_end = std::string_view::npos;  // end of a run of unknown pieces being fused
    while (end > 0) {
      const Node& node = best[end];
      if (unk_id_ && node.id == *unk_id_) {
        if (unk_end == std::string_view::npos) unk_end = end;
      } else {
        if (unk_end != std::string_view::npos) {
          out.push_back(text.substr(end, unk_end - end));
          unk_end = std::string_view::npos;
        }
        out.push_back(text.substr(node.start, end - node.start));
      }
      end = node.start;
    }
    if (unk_end != std::string_view::npos) out.push_back(text.substr(0, unk_end));
    std::reverse(out.begin(), out.end());
  }

  std::string file_;
  std::vector<std::string> pieces_;
  std::vector<double> scores_;
  std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>> ids_;
  // Every proper prefix of a piece, so the lattice search stops as soon as nothing can match.
  std::unordered_map<std::string, int, StringHash, std::equal_to<>> prefixes_;
  size_t max_piece_ = 0;
  double min_score_ = 0;
  std::optional<uint32_t> unk_id_;
  bool byte_fallback_ = false;
};

}  // namespace

std::unique_ptr<Model> make_model(const json& config, const Where& where) {
  // Files from tokenizers < 0.11 may omit the type; the fields tell the model apart.
  std::string type;
  if (config.is_object() && config.contains("type")) {
    type = get_type(config, where);
  } else if (config.is_object() && config.contains("merges")) {
    type = "BPE";
  } else if (config.is_object() && config.contains("vocab") && config["vocab"].is_array()) {
    type = "Unigram";
  } else {
    where.fail("missing key 'type'");
  }
  if (type == "BPE") return std::make_unique<Bpe>(config, where);
  if (type == "WordPiece") return std::make_unique<WordPiece>(config, where);
  if (type == "WordLevel") return std::make_unique<WordLevel>(config, where);
  if (type == "Unigram") return std::make_unique<Unigram>(config, where);
  where.fail("unknown model type '{}'", printable(type));
}

}  // namespace tpe::tokenizer::detail
