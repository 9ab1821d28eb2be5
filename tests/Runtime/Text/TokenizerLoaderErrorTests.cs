using System.Text;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Tests.Runtime.Text;

/// <summary>Malformed files give an error that names the file (and the line or record where it makes sense).</summary>
public class TokenizerLoaderErrorTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "ftn-tokerr-" + Guid.NewGuid().ToString("N"));
    public TokenizerLoaderErrorTests() { Directory.CreateDirectory(_dir); }
    public void Dispose() { Directory.Delete(_dir, recursive: true); }

    private string Write(string name, byte[] data)
    {
        var p = Path.Combine(_dir, name);
        Directory.CreateDirectory(Path.GetDirectoryName(p)!);
        File.WriteAllBytes(p, data);
        return p;
    }

    private string Write(string name, string text) => Write(name, Encoding.UTF8.GetBytes(text));

    private static void AssertNames<T>(string path, Action load, params string[] fragments) where T : Exception
    {
        var e = Assert.ThrowsAny<T>(load);
        Assert.Contains(path, e.Message);
        foreach (var f in fragments) Assert.Contains(f, e.Message);
    }

    /// <summary>A valid llama2.c tokenizer.bin with the 3 specials and 256 byte pieces plus a few merges.</summary>
    private static byte[] MiniLlama2cBin(int extraRecords = 0)
    {
        var ms = new MemoryStream();
        var w = new BinaryWriter(ms);
        var pieces = new List<(float, string)> { (0, "<unk>"), (0, "\n<s>\n"), (0, "\n</s>\n") };
        for (int b = 0; b < 256; b++) pieces.Add((0, $"<0x{b:X2}>"));
        pieces.AddRange(new[] { (-1f, " "), (-2f, "a"), (-3f, "b"), (-4f, "ab"), (-5f, " ab") });
        w.Write((uint)6);
        foreach (var (score, s) in pieces)
        {
            var bytes = Encoding.UTF8.GetBytes(s);
            w.Write(score); w.Write(bytes.Length); w.Write(bytes);
        }
        return ms.ToArray();
    }

    [Fact]
    public void Llama2cBin_ValidMiniFile_EncodesLikeRunC()
    {
        var p = Write("tokenizer.bin", MiniLlama2cBin());
        var tok = TokenizerLoader.Load(p);
        Assert.Equal(264, tok.VocabSize);
        // ids: 259 " ", 260 a, 261 b, 262 ab, 263 " ab". Dummy prefix: " " a b; " a" is no piece, "ab" merges, then " "+"ab".
        Assert.Equal(new[] { 1, 263 }, tok.Encode("ab", addBos: true));
        // "abc": " " a b <0x63> -> " " ab <0x63> -> " ab" <0x63>; 'c' is byte 0x63 -> id 0x63 + 3.
        Assert.Equal(new[] { 263, 0x63 + 3 }, tok.Encode("abc"));
        Assert.Equal("ab", tok.Decode(tok.Encode("ab", addBos: true), skipSpecialTokens: true));
    }

    [Fact]
    public void Llama2cBin_Truncated_NamesFileAndToken()
    {
        var data = MiniLlama2cBin();
        var p = Write("tokenizer.bin", data[..(data.Length - 2)]);
        AssertNames<InvalidDataException>(p, () => TokenizerLoader.Load(p), "token 263");
        var p2 = Write("short/tokenizer.bin", new byte[] { 7, 0 });
        AssertNames<InvalidDataException>(p2, () => TokenizerLoader.Load(p2));
        var p3 = Write("few/tokenizer.bin", MiniLlama2cBin()[..(4 + 3 * 8 + 5 + 7 + 8)]);
        AssertNames<InvalidDataException>(p3, () => TokenizerLoader.Load(p3));
    }

    [Fact]
    public void TokenizerJson_BadJsonOrUnsupported_NamesFile()
    {
        var p = Write("bad/tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0,}\n, ");
        AssertNames<InvalidDataException>(p, () => TokenizerLoader.Load(Path.GetDirectoryName(p)!), "line");
        var p2 = Write("uni/tokenizer.json", "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}");
        AssertNames<NotSupportedException>(p2, () => TokenizerLoader.Load(p2), "Unigram");
        var p3 = Write("nomodel/tokenizer.json", "{\"version\": \"1.0\"}");
        AssertNames<InvalidDataException>(p3, () => TokenizerLoader.Load(p3), "model");
        var p4 = Write("badid/tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"x\"}, \"merges\": []}}");
        AssertNames<InvalidDataException>(p4, () => TokenizerLoader.Load(p4), "\"a\"");
        var p5 = Write("pre/tokenizer.json", "{\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}");
        AssertNames<NotSupportedException>(p5, () => TokenizerLoader.Load(p5), "BertPreTokenizer");
    }

    [Fact]
    public void TokenizerConfig_UnknownEosToken_NamesConfigFile()
    {
        Write("cfg/tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}}");
        var cfg = Write("cfg/tokenizer_config.json", "{\"eos_token\": \"<|nope|>\"}");
        AssertNames<InvalidDataException>(cfg, () => TokenizerLoader.Load(Path.Combine(_dir, "cfg")), "<|nope|>");
    }

    [Fact]
    public void Tiktoken_BadLine_NamesFileAndLine()
    {
        var p = Write("tt/tokenizer.model", "IQ== 0\nIg== 1\nthis is not base64! 2\n");
        AssertNames<InvalidDataException>(p, () => TokenizerLoader.Load(p), ":3:");
        var p2 = Write("tt2/tokenizer.model", "IQ== 0\nIg== 5\n");
        AssertNames<InvalidDataException>(p2, () => TokenizerLoader.Load(p2), "rank 1 is missing");
    }

    [Fact]
    public void SentencePiece_Corrupt_NamesFile()
    {
        // Field 1 (pieces), length 100, but only 3 bytes follow.
        var p = Write("sp/tokenizer.model", new byte[] { 0x0A, 100, 0x0A, 0x01, 0x41 });
        AssertNames<InvalidDataException>(p, () => TokenizerLoader.Load(p), "SentencePiece");
    }

    [Fact]
    public void MissingOrUnknown_NamesPath()
    {
        var empty = Path.Combine(_dir, "empty");
        Directory.CreateDirectory(empty);
        AssertNames<FileNotFoundException>(empty, () => TokenizerLoader.Load(empty), "tokenizer.json");
        var p = Write("x/weird.dat", new byte[] { 0xFF, 0xFF, 0xFF, 0xFF, 0x00 });
        AssertNames<InvalidDataException>(p, () => TokenizerLoader.Load(p), "unrecognised");
        AssertNames<FileNotFoundException>(Path.Combine(_dir, "nope.model"), () => TokenizerLoader.Load(Path.Combine(_dir, "nope.model")));
    }
}
