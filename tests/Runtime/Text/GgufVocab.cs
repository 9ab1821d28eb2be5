using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace FineTuneNative.Tests.Runtime.Text;

/// <summary>
/// Test-only: reads the tokenizer.ggml.* metadata of llama.cpp's vocab-only GGUF files (v3: magic, version,
/// tensor count, kv count, then key / type / value) and writes it out as a Hugging Face tokenizer.json, so the
/// byte-level BPE path of our loader can be checked against llama.cpp's vectors for those vocabularies.
/// </summary>
internal sealed class GgufVocab
{
    public string[] Tokens = Array.Empty<string>();
    public int[] TokenTypes = Array.Empty<int>();
    public string[] Merges = Array.Empty<string>();
    public string Pre = "";
    public string Model = "";
    /// <summary>tokenizer.chat_template ("" when absent).</summary>
    public string ChatTemplate = "";

    public static GgufVocab Read(string path)
    {
        using var r = new BinaryReader(File.OpenRead(path));
        if (Encoding.ASCII.GetString(r.ReadBytes(4)) != "GGUF") throw new InvalidDataException($"{path}: not GGUF");
        uint version = r.ReadUInt32();
        if (version != 3) throw new InvalidDataException($"{path}: GGUF v{version}");
        r.ReadUInt64();
        ulong kvs = r.ReadUInt64();
        var v = new GgufVocab();
        string Str() => Encoding.UTF8.GetString(r.ReadBytes(checked((int)r.ReadUInt64())));
        object Value(uint type)
        {
            switch (type)
            {
                case 0: return r.ReadByte();
                case 1: return r.ReadSByte();
                case 2: return r.ReadUInt16();
                case 3: return r.ReadInt16();
                case 4: return r.ReadUInt32();
                case 5: return r.ReadInt32();
                case 6: return r.ReadSingle();
                case 7: return r.ReadByte() != 0;
                case 8: return Str();
                case 9:
                    {
                        uint et = r.ReadUInt32();
                        int n = checked((int)r.ReadUInt64());
                        var arr = new object[n];
                        for (int i = 0; i < n; i++) arr[i] = Value(et);
                        return arr;
                    }
                case 10: return r.ReadUInt64();
                case 11: return r.ReadInt64();
                case 12: return r.ReadDouble();
                default: throw new InvalidDataException($"{path}: GGUF value type {type}");
            }
        }
        for (ulong i = 0; i < kvs; i++)
        {
            var key = Str();
            var val = Value(r.ReadUInt32());
            switch (key)
            {
                case "tokenizer.ggml.tokens": v.Tokens = ((object[])val).Cast<string>().ToArray(); break;
                case "tokenizer.ggml.token_type": v.TokenTypes = ((object[])val).Select(Convert.ToInt32).ToArray(); break;
                case "tokenizer.ggml.merges": v.Merges = ((object[])val).Cast<string>().ToArray(); break;
                case "tokenizer.ggml.pre": v.Pre = (string)val; break;
                case "tokenizer.ggml.model": v.Model = (string)val; break;
                case "tokenizer.chat_template": v.ChatTemplate = (string)val; break;
            }
        }
        return v;
    }

    /// <summary>A byte-level BPE tokenizer.json: GPT-2's ByteLevel pre-tokenizer, control/user-defined tokens as added tokens.</summary>
    /// <param name="individualDigits">Digits(individual_digits) before ByteLevel, as in StarCoder's tokenizer.json.</param>
    public void WriteByteLevelTokenizerJson(string path, bool individualDigits = false)
    {
        using var fs = File.Create(path);
        using var w = new Utf8JsonWriter(fs, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
        w.WriteStartObject();
        w.WriteStartArray("added_tokens");
        for (int i = 0; i < Tokens.Length; i++)
            if (TokenTypes[i] is 3 or 4)   // llama.cpp: 3 CONTROL, 4 USER_DEFINED
            {
                w.WriteStartObject(); w.WriteNumber("id", i); w.WriteString("content", Tokens[i]); w.WriteBoolean("special", TokenTypes[i] == 3); w.WriteEndObject();
            }
        w.WriteEndArray();
        w.WriteNull("normalizer");
        w.WriteStartObject("pre_tokenizer");
        w.WriteString("type", "Sequence");
        w.WriteStartArray("pretokenizers");
        if (individualDigits) { w.WriteStartObject(); w.WriteString("type", "Digits"); w.WriteBoolean("individual_digits", true); w.WriteEndObject(); }
        w.WriteStartObject(); w.WriteString("type", "ByteLevel"); w.WriteBoolean("add_prefix_space", false); w.WriteBoolean("use_regex", true); w.WriteEndObject();
        w.WriteEndArray();
        w.WriteEndObject();
        w.WriteStartObject("decoder"); w.WriteString("type", "ByteLevel"); w.WriteEndObject();
        w.WriteStartObject("model");
        w.WriteString("type", "BPE");
        w.WriteStartObject("vocab");
        for (int i = 0; i < Tokens.Length; i++) w.WriteNumber(Tokens[i], i);
        w.WriteEndObject();
        w.WriteStartArray("merges");
        foreach (var m in Merges) w.WriteStringValue(m);
        w.WriteEndArray();
        w.WriteEndObject();
        w.WriteEndObject();
    }
}
