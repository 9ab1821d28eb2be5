namespace FineTuneNative.Runtime.Text;

/// <summary>
/// GPT-2's byte-to-unicode table used by byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM tokenizer.json):
/// printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ' map to themselves, the other 68 bytes to U+0100.. in byte order
/// (so ' ' is 'Ġ' U+0120 and '\n' is 'Ċ' U+010A).
/// </summary>
public static class ByteLevelMap
{
    public static readonly char[] ByteToChar = Build();
    private static readonly Dictionary<char, byte> CharToByteMap = ByteToChar.Select((c, b) => (c, b)).ToDictionary(t => t.c, t => (byte)t.b);

    private static char[] Build()
    {
        var map = new char[256];
        int n = 0;
        for (int b = 0; b < 256; b++)
        {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = printable ? (char)b : (char)(256 + n++);
        }
        return map;
    }

    public static bool TryCharToByte(char c, out byte b) => CharToByteMap.TryGetValue(c, out b);

    /// <summary>Bytes to the byte-level string (one char per byte).</summary>
    public static string Encode(ReadOnlySpan<byte> bytes)
    {
        var chars = new char[bytes.Length];
        for (int i = 0; i < bytes.Length; i++) chars[i] = ByteToChar[bytes[i]];
        return new string(chars);
    }

    /// <summary>A byte-level token string back to bytes; chars outside the table pass through as UTF-8.</summary>
    public static byte[] Decode(string token)
    {
        var outBytes = new List<byte>(token.Length);
        foreach (char c in token)
        {
            if (CharToByteMap.TryGetValue(c, out byte b)) outBytes.Add(b);
            else outBytes.AddRange(System.Text.Encoding.UTF8.GetBytes(c.ToString()));
        }
        return outBytes.ToArray();
    }
}
