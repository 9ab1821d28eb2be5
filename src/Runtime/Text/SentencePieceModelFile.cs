using System.Text;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// The fields of a SentencePiece ModelProto (tokenizer.model) that we need, read straight from the protobuf
/// wire format: pieces (text, score, type), the trainer's model type / byte_fallback / special ids, and the
/// normalizer's whitespace flags. Used to validate the file with a clear error, to find control tokens, and
/// to report what the file is; encoding itself goes through Microsoft.ML.Tokenizers.
/// </summary>
internal sealed class SentencePieceModelFile
{
    public enum PieceType { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Byte = 6, Unused = 5 }
    public readonly record struct Piece(string Text, float Score, PieceType Type);

    public List<Piece> Pieces { get; } = new();
    /// <summary>1 unigram, 2 BPE, 3 word, 4 char (sentencepiece_model.proto TrainerSpec.ModelType).</summary>
    public int ModelType { get; private set; } = 1;
    public bool ByteFallback { get; private set; }
    public int UnkId { get; private set; }
    public int BosId { get; private set; } = 1;
    public int EosId { get; private set; } = 2;
    public int PadId { get; private set; } = -1;
    public bool AddDummyPrefix { get; private set; } = true;
    public bool RemoveExtraWhitespaces { get; private set; } = true;
    public bool EscapeWhitespaces { get; private set; } = true;
    /// <summary>normalizer_spec.name: "identity" for Llama 2 and llama2.c's tokenizers, "nmt_nfkc" by default.</summary>
    public string NormalizerName { get; private set; } = "nmt_nfkc";

    /// <summary>True when the bytes look like a serialized ModelProto (first field is a length-delimited piece).</summary>
    public static bool LooksLikeModelProto(ReadOnlySpan<byte> head) => head.Length > 2 && head[0] == 0x0A;

    public static SentencePieceModelFile Parse(byte[] data, string path)
    {
        var m = new SentencePieceModelFile();
        try
        {
            var r = new Reader(data, 0, data.Length);
            while (!r.End)
            {
                var (field, wire) = r.Tag();
                if (field == 1 && wire == 2) m.Pieces.Add(ParsePiece(r.Sub()));
                else if (field == 2 && wire == 2) m.ParseTrainer(r.Sub());
                else if (field == 3 && wire == 2) m.ParseNormalizer(r.Sub());
                else r.Skip(wire);
            }
        }
        catch (Exception e) when (e is InvalidDataException or IndexOutOfRangeException or ArgumentException or OverflowException)
        {
            throw new InvalidDataException($"{path}: not a valid SentencePiece model (protobuf ModelProto): {e.Message}", e);
        }
        if (m.Pieces.Count == 0) throw new InvalidDataException($"{path}: SentencePiece model has no pieces");
        return m;
    }

    private static Piece ParsePiece(Reader r)
    {
        string text = ""; float score = 0; var type = PieceType.Normal;
        while (!r.End)
        {
            var (f, w) = r.Tag();
            if (f == 1 && w == 2) text = Encoding.UTF8.GetString(r.Bytes());
            else if (f == 2 && w == 5) score = r.Float();
            else if (f == 3 && w == 0) type = (PieceType)(int)r.Varint();
            else r.Skip(w);
        }
        return new Piece(text, score, type);
    }

    private void ParseTrainer(Reader r)
    {
        while (!r.End)
        {
            var (f, w) = r.Tag();
            if (w != 0) { r.Skip(w); continue; }
            long v = (long)r.Varint();
            switch (f)
            {
                case 3: ModelType = (int)v; break;
                case 35: ByteFallback = v != 0; break;
                case 40: UnkId = (int)v; break;
                case 41: BosId = (int)v; break;
                case 42: EosId = (int)v; break;
                case 43: PadId = (int)v; break;
            }
        }
    }

    private void ParseNormalizer(Reader r)
    {
        while (!r.End)
        {
            var (f, w) = r.Tag();
            if (f == 1 && w == 2) { NormalizerName = Encoding.UTF8.GetString(r.Bytes()); continue; }
            if (w != 0) { r.Skip(w); continue; }
            bool v = r.Varint() != 0;
            switch (f)
            {
                case 3: AddDummyPrefix = v; break;
                case 4: RemoveExtraWhitespaces = v; break;
                case 5: EscapeWhitespaces = v; break;
            }
        }
    }

    private sealed class Reader
    {
        private readonly byte[] _d; private int _p; private readonly int _end;
        public Reader(byte[] d, int p, int end) { _d = d; _p = p; _end = end; }
        public bool End => _p >= _end;
        public ulong Varint()
        {
            ulong v = 0;
            for (int shift = 0; ; shift += 7)
            {
                if (_p >= _end || shift > 63) throw new InvalidDataException($"bad varint at byte {_p}");
                byte b = _d[_p++];
                v |= (ulong)(b & 0x7F) << shift;
                if ((b & 0x80) == 0) return v;
            }
        }
        public (int Field, int Wire) Tag() { ulong t = Varint(); return ((int)(t >> 3), (int)(t & 7)); }
        public Reader Sub() { int len = checked((int)Varint()); Check(len); var r = new Reader(_d, _p, _p + len); _p += len; return r; }
        public byte[] Bytes() { int len = checked((int)Varint()); Check(len); var b = _d.AsSpan(_p, len).ToArray(); _p += len; return b; }
        public float Float() { Check(4); float f = BitConverter.ToSingle(_d, _p); _p += 4; return f; }
        private void Check(int len) { if (len < 0 || _p + len > _end) throw new InvalidDataException($"field of {len} bytes at byte {_p} runs past its message"); }
        public void Skip(int wire)
        {
            switch (wire)
            {
                case 0: Varint(); break;
                case 1: Check(8); _p += 8; break;
                case 2: { int len = checked((int)Varint()); Check(len); _p += len; break; }
                case 5: Check(4); _p += 4; break;
                default: throw new InvalidDataException($"unsupported protobuf wire type {wire} at byte {_p}");
            }
        }
    }
}
