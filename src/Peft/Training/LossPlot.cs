using System.Buffers.Binary;
using System.Globalization;
using System.IO.Compression;
using System.Text;

namespace FineTuneNative.Peft.Training;

/// <summary>
/// The loss curve of a run as a PNG: training loss per step (blue line), eval loss (orange points joined), axes
/// with tick labels. Drawn into an RGB raster and encoded here (IHDR / IDAT zlib / IEND chunks with CRC-32), so
/// no plotting package or native library is needed; the served plotting packages (ScottPlot, OxyPlot.SkiaSharp)
/// all pull SkiaSharp's native binaries and a font setup, a heavy dependency for one chart.
/// </summary>
public static class LossPlot
{
    private const int W = 800, H = 480, Left = 70, Right = 20, Top = 30, Bottom = 50;

    /// <summary>Writes the chart to <paramref name="path"/> (temporary file, then rename).</summary>
    public static void Write(string path, IReadOnlyList<(int Step, double Loss)> train, IReadOnlyList<(int Step, double Loss)> eval, string title)
    {
        var img = new byte[W * H * 3];
        Array.Fill(img, (byte)255);
        var all = train.Concat(eval).Where(p => double.IsFinite(p.Loss)).ToList();
        double x0 = 0, x1 = Math.Max(1, all.Count > 0 ? all.Max(p => p.Step) : 1);
        double y0 = all.Count > 0 ? all.Min(p => p.Loss) : 0, y1 = all.Count > 0 ? all.Max(p => p.Loss) : 1;
        if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
        double pad = (y1 - y0) * 0.05;
        y0 = Math.Max(0, y0 - pad); y1 += pad;
        int Px(double x) => Left + (int)Math.Round((x - x0) / (x1 - x0) * (W - Left - Right));
        int Py(double y) => H - Bottom - (int)Math.Round((y - y0) / (y1 - y0) * (H - Top - Bottom));

        // grid, ticks and labels
        for (int i = 0; i <= 5; i++)
        {
            double yv = y0 + (y1 - y0) * i / 5;
            int y = Py(yv);
            Line(img, Left, y, W - Right, y, (230, 230, 230));
            Text(img, Left - 6 - 8 * Fmt(yv).Length, y - 5, Fmt(yv), (60, 60, 60));
            double xv = x0 + (x1 - x0) * i / 5;
            int x = Px(xv);
            Line(img, x, Top, x, H - Bottom, (230, 230, 230));
            string xl = ((int)Math.Round(xv)).ToString(CultureInfo.InvariantCulture);
            Text(img, x - 4 * xl.Length, H - Bottom + 8, xl, (60, 60, 60));
        }
        Line(img, Left, Top, Left, H - Bottom, (0, 0, 0));
        Line(img, Left, H - Bottom, W - Right, H - Bottom, (0, 0, 0));
        Text(img, (W - 32) / 2, H - 20, "step", (0, 0, 0));
        Text(img, 8, Top - 20, "loss", (0, 0, 0));
        Text(img, W - 220, Top - 20, "train", (31, 119, 180));
        Text(img, W - 120, Top - 20, "eval", (255, 127, 14));
        Text(img, Left + 60, Top - 20, new string(title.ToLowerInvariant().Where(c => Glyphs.ContainsKey(c)).ToArray()), (0, 0, 0));

        // series
        var tr = train.Where(p => double.IsFinite(p.Loss)).OrderBy(p => p.Step).ToList();
        for (int i = 1; i < tr.Count; i++) Line(img, Px(tr[i - 1].Step), Py(tr[i - 1].Loss), Px(tr[i].Step), Py(tr[i].Loss), (31, 119, 180));
        if (tr.Count == 1) Dot(img, Px(tr[0].Step), Py(tr[0].Loss), 2, (31, 119, 180));
        var ev = eval.Where(p => double.IsFinite(p.Loss)).OrderBy(p => p.Step).ToList();
        for (int i = 0; i < ev.Count; i++)
        {
            if (i > 0) Line(img, Px(ev[i - 1].Step), Py(ev[i - 1].Loss), Px(ev[i].Step), Py(ev[i].Loss), (255, 127, 14));
            Dot(img, Px(ev[i].Step), Py(ev[i].Loss), 3, (255, 127, 14));
        }

        string full = Path.GetFullPath(path);
        string tmp = full + $".{Environment.ProcessId}.tmp";
        try
        {
            File.WriteAllBytes(tmp, EncodePng(img, W, H));
            File.Move(tmp, full, overwrite: true);
        }
        finally { if (File.Exists(tmp)) File.Delete(tmp); }
    }

    private static string Fmt(double v) =>
        Math.Abs(v) >= 100 ? v.ToString("0", CultureInfo.InvariantCulture)
        : Math.Abs(v) >= 1 ? v.ToString("0.00", CultureInfo.InvariantCulture)
        : v.ToString("0.000", CultureInfo.InvariantCulture);

    private static void Set(byte[] img, int x, int y, (byte R, byte G, byte B) c)
    {
        if ((uint)x >= W || (uint)y >= H) return;
        int o = (y * W + x) * 3;
        img[o] = c.R; img[o + 1] = c.G; img[o + 2] = c.B;
    }

    /// <summary>Bresenham, two pixels thick.</summary>
    private static void Line(byte[] img, int xa, int ya, int xb, int yb, (byte, byte, byte) c)
    {
        int dx = Math.Abs(xb - xa), dy = -Math.Abs(yb - ya), sx = xa < xb ? 1 : -1, sy = ya < yb ? 1 : -1, err = dx + dy;
        while (true)
        {
            Set(img, xa, ya, c);
            Set(img, dx > -dy ? xa : xa + 1, dx > -dy ? ya + 1 : ya, c);
            if (xa == xb && ya == yb) break;
            int e2 = 2 * err;
            if (e2 >= dy) { err += dy; xa += sx; }
            if (e2 <= dx) { err += dx; ya += sy; }
        }
    }

    private static void Dot(byte[] img, int x, int y, int r, (byte, byte, byte) c)
    {
        for (int j = -r; j <= r; j++) for (int i = -r; i <= r; i++) if (i * i + j * j <= r * r) Set(img, x + i, y + j, c);
    }

    // 3×5 glyphs, rows top to bottom, bit 2 = left column; drawn at 2× scale (6×10 px, 8 px advance).
    private static readonly Dictionary<char, int[]> Glyphs = new()
    {
        ['0'] = [7, 5, 5, 5, 7], ['1'] = [2, 6, 2, 2, 7], ['2'] = [7, 1, 7, 4, 7], ['3'] = [7, 1, 7, 1, 7], ['4'] = [5, 5, 7, 1, 1],
        ['5'] = [7, 4, 7, 1, 7], ['6'] = [7, 4, 7, 5, 7], ['7'] = [7, 1, 1, 1, 1], ['8'] = [7, 5, 7, 5, 7], ['9'] = [7, 5, 7, 1, 7],
        ['.'] = [0, 0, 0, 0, 2], ['-'] = [0, 0, 7, 0, 0], [' '] = [0, 0, 0, 0, 0], ['e'] = [7, 5, 7, 4, 7], ['a'] = [2, 5, 7, 5, 5],
        ['l'] = [4, 4, 4, 4, 7], ['o'] = [7, 5, 5, 5, 7], ['s'] = [7, 4, 7, 1, 7], ['t'] = [7, 2, 2, 2, 2], ['p'] = [7, 5, 7, 4, 4],
        ['r'] = [6, 5, 6, 5, 5], ['i'] = [7, 2, 2, 2, 7], ['n'] = [6, 5, 5, 5, 5], ['v'] = [5, 5, 5, 5, 2], ['g'] = [7, 4, 5, 5, 7],
        ['u'] = [5, 5, 5, 5, 7], ['f'] = [7, 4, 6, 4, 4], ['d'] = [6, 5, 5, 5, 6], ['m'] = [5, 7, 7, 5, 5], ['h'] = [5, 5, 7, 5, 5],
        ['c'] = [7, 4, 4, 4, 7], ['k'] = [5, 5, 6, 5, 5], ['x'] = [5, 5, 2, 5, 5], ['y'] = [5, 5, 2, 2, 2], ['b'] = [6, 5, 6, 5, 6],
        ['w'] = [5, 5, 7, 7, 5], ['q'] = [7, 5, 5, 7, 1], ['j'] = [1, 1, 1, 5, 7], ['z'] = [7, 1, 2, 4, 7], ['/'] = [1, 1, 2, 4, 4],
        ['('] = [1, 2, 2, 2, 1], [')'] = [4, 2, 2, 2, 4], [':'] = [0, 2, 0, 2, 0], ['='] = [0, 7, 0, 7, 0], ['+'] = [0, 2, 7, 2, 0],
    };

    private static void Text(byte[] img, int x, int y, string s, (byte, byte, byte) c)
    {
        foreach (char ch in s)
        {
            if (Glyphs.TryGetValue(char.ToLowerInvariant(ch), out var g))
                for (int r = 0; r < 5; r++)
                    for (int col = 0; col < 3; col++)
                        if ((g[r] >> (2 - col) & 1) != 0)
                            for (int dy = 0; dy < 2; dy++) for (int dx = 0; dx < 2; dx++) Set(img, x + col * 2 + dx, y + r * 2 + dy, c);
            x += 8;
        }
    }

    // ------------------------------------------------------------------------------------------ PNG

    /// <summary>An 8-bit RGB PNG (filter 0 on every row, zlib-compressed IDAT).</summary>
    public static byte[] EncodePng(byte[] rgb, int width, int height)
    {
        if (rgb.Length != width * height * 3) throw new ArgumentException($"{rgb.Length} bytes are not {width}x{height} RGB");
        using var raw = new MemoryStream();
        using (var z = new ZLibStream(raw, CompressionLevel.Optimal, leaveOpen: true))
            for (int y = 0; y < height; y++)
            {
                z.WriteByte(0);
                z.Write(rgb, y * width * 3, width * 3);
            }
        using var png = new MemoryStream();
        png.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        var ihdr = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(ihdr, width);
        BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = 8; ihdr[9] = 2; // 8 bits, truecolour; compression, filter, interlace 0
        Chunk(png, "IHDR", ihdr);
        Chunk(png, "IDAT", raw.ToArray());
        Chunk(png, "IEND", Array.Empty<byte>());
        return png.ToArray();
    }

    private static void Chunk(Stream s, string type, byte[] data)
    {
        Span<byte> b4 = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(b4, data.Length);
        s.Write(b4);
        var td = new byte[4 + data.Length];
        Encoding.ASCII.GetBytes(type, td);
        data.CopyTo(td, 4);
        s.Write(td);
        BinaryPrimitives.WriteUInt32BigEndian(b4, Crc32(td));
        s.Write(b4);
    }

    private static readonly uint[] CrcTable = Enumerable.Range(0, 256).Select(n =>
    {
        uint c = (uint)n;
        for (int k = 0; k < 8; k++) c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        return c;
    }).ToArray();

    /// <summary>CRC-32 (ISO-HDLC, PNG's); "123456789" gives 0xCBF43926.</summary>
    public static uint Crc32(ReadOnlySpan<byte> data)
    {
        uint c = 0xFFFFFFFFu;
        foreach (byte b in data) c = CrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }
}
