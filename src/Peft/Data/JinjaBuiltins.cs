using System.Globalization;
using System.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>Python-like value semantics, filters, tests and globals for <see cref="JinjaTemplate"/>.</summary>
internal static class Builtins
{
    public static Dictionary<string, object?> Globals(string source) => new()
    {
        ["raise_exception"] = new JinjaFunction((a, _) => throw new TemplateException($"{source}: the template raised: {(a.Count > 0 ? Str(a[0]) : "")}")),
        ["namespace"] = new JinjaFunction((a, kw) =>
        {
            var ns = new JinjaNamespace();
            if (a.Count > 0 && a[0] is Dictionary<string, object?> d) foreach (var (k, v) in d) ns.Values[k] = v;
            foreach (var (k, v) in kw) ns.Values[k] = v;
            return ns;
        }),
        ["range"] = new JinjaFunction((a, _) =>
        {
            long start = 0, stop, step = 1;
            if (a.Count == 1) stop = ToLong(a[0], source);
            else { start = ToLong(a[0], source); stop = ToLong(a[1], source); if (a.Count > 2) step = ToLong(a[2], source); }
            if (step == 0) throw new TemplateException($"{source}: range() step must not be zero");
            var list = new List<object?>();
            for (long i = start; step > 0 ? i < stop : i > stop; i += step) list.Add(i);
            return list;
        }),
        // transformers passes strftime_now(format) to templates (Llama 3.1+ print today's date with it)
        ["strftime_now"] = new JinjaFunction((a, _) => Strftime(DateTime.Now, a.Count > 0 ? Str(a[0]) : "")),
    };

    /// <summary>Python's datetime.strftime for the directives chat templates use (%d %m %Y %y %b %B %H %M %S %%).</summary>
    public static string Strftime(DateTime t, string f)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < f.Length; i++)
        {
            if (f[i] != '%' || i + 1 == f.Length) { sb.Append(f[i]); continue; }
            char c = f[++i];
            sb.Append(c switch
            {
                'd' => t.ToString("dd", CultureInfo.InvariantCulture),
                'm' => t.ToString("MM", CultureInfo.InvariantCulture),
                'Y' => t.ToString("yyyy", CultureInfo.InvariantCulture),
                'y' => t.ToString("yy", CultureInfo.InvariantCulture),
                'b' => t.ToString("MMM", CultureInfo.InvariantCulture),
                'B' => t.ToString("MMMM", CultureInfo.InvariantCulture),
                'H' => t.ToString("HH", CultureInfo.InvariantCulture),
                'M' => t.ToString("mm", CultureInfo.InvariantCulture),
                'S' => t.ToString("ss", CultureInfo.InvariantCulture),
                '%' => "%",
                _ => "%" + c,
            });
        }
        return sb.ToString();
    }

    // ------------------------------------------------------------------------------------------ values

    public static string TypeName(object? v) => v switch
    {
        null => "None",
        JinjaUndefined => "an undefined value",
        bool => "a boolean",
        long => "an integer",
        double => "a float",
        string => "a string",
        List<object?> => "a list",
        Dictionary<string, object?> => "a dict",
        _ => v.GetType().Name,
    };

    public static bool Truthy(object? v) => v switch
    {
        null or JinjaUndefined => false,
        bool b => b,
        long l => l != 0,
        double d => d != 0,
        string s => s.Length > 0,
        List<object?> l => l.Count > 0,
        Dictionary<string, object?> d => d.Count > 0,
        _ => true,
    };

    /// <summary>jinja2's object_type_repr: 'None', 'str object', 'dict object'... (as its undefined-attribute errors say).</summary>
    public static string ObjectTypeRepr(object? v) => v switch
    {
        null => "None",
        JinjaUndefined => "Undefined",
        bool => "bool object",
        long => "int object",
        double => "float object",
        string => "str object",
        List<object?> => "list object",
        Dictionary<string, object?> => "dict object",
        _ => v.GetType().Name + " object",
    };

    /// <summary>Python's str().</summary>
    public static string Str(object? v) => v switch
    {
        null => "None",
        JinjaUndefined => "",
        string s => s,
        _ => Repr(v),
    };

    /// <summary>Python's repr() (strings quoted as Python does for plain text).</summary>
    public static string Repr(object? v) => v switch
    {
        null => "None",
        JinjaUndefined => "",
        bool b => b ? "True" : "False",
        long l => l.ToString(CultureInfo.InvariantCulture),
        double d => FloatRepr(d),
        string s => s.Contains('\'') && !s.Contains('"') ? "\"" + s + "\"" : "'" + s.Replace("\\", "\\\\").Replace("'", "\\'").Replace("\n", "\\n") + "'",
        List<object?> l => "[" + string.Join(", ", l.Select(Repr)) + "]",
        Dictionary<string, object?> d => "{" + string.Join(", ", d.Select(kv => Repr(kv.Key) + ": " + Repr(kv.Value))) + "}",
        JinjaNamespace => "<Namespace>",
        _ => v.ToString() ?? "",
    };

    private static string FloatRepr(double d)
    {
        if (double.IsNaN(d)) return "nan";
        if (double.IsInfinity(d)) return d > 0 ? "inf" : "-inf";
        string s = d.ToString("R", CultureInfo.InvariantCulture);
        return s.Contains('.') || s.Contains('E') ? s.Replace("E", "e") : s + ".0";
    }

    public static long ToLong(object? v, string source) => v switch
    {
        long l => l,
        bool b => b ? 1 : 0,
        double d => (long)d,
        _ => throw new TemplateException($"{source}: expected an integer, found {TypeName(v)}"),
    };

    public static IEnumerable<object?> Iterate(object? v, string source, int line) => v switch
    {
        List<object?> l => l,
        Dictionary<string, object?> d => d.Keys,
        string s => s.Select(c => (object?)c.ToString()),
        JinjaUndefined => Array.Empty<object?>(),
        _ => throw new TemplateException($"{source}:{line}: {TypeName(v)} is not iterable"),
    };

    public static new bool Equals(object? a, object? b)
    {
        if (a is JinjaUndefined || b is JinjaUndefined) return a is JinjaUndefined && b is JinjaUndefined;
        if (a is null || b is null) return a is null && b is null;
        if (IsNumber(a) && IsNumber(b)) return ToDouble(a) == ToDouble(b);
        if (a is string sa && b is string sb) return sa == sb;
        if (a is List<object?> la && b is List<object?> lb) return la.Count == lb.Count && la.Zip(lb).All(p => Equals(p.First, p.Second));
        if (a is Dictionary<string, object?> da && b is Dictionary<string, object?> db)
            return da.Count == db.Count && da.All(kv => db.TryGetValue(kv.Key, out var o) && Equals(kv.Value, o));
        return ReferenceEquals(a, b);
    }

    private static bool IsNumber(object? v) => v is long or double or bool;
    private static double ToDouble(object? v) => v switch { long l => l, double d => d, bool b => b ? 1 : 0, _ => double.NaN };

    public static object? GetAttr(object? obj, string name)
    {
        switch (obj)
        {
            case Dictionary<string, object?> d:
                if (d.TryGetValue(name, out var v)) return v;
                return DictMethod(d, name) ?? (object)JinjaUndefined.Instance;
            case JinjaNamespace ns: return ns.Values.TryGetValue(name, out var nv) ? nv : JinjaUndefined.Instance;
            case string s: return StringMethod(s, name) ?? (object)JinjaUndefined.Instance;
            default: return JinjaUndefined.Instance;
        }
    }

    public static object? GetItem(object? obj, object? index, string source, int line)
    {
        switch (obj)
        {
            case Dictionary<string, object?> d:
                return d.TryGetValue(Str(index), out var v) ? v : JinjaUndefined.Instance;
            case List<object?> l when index is long or bool:
            {
                long i = ToLong(index, source);
                if (i < 0) i += l.Count;
                return i >= 0 && i < l.Count ? l[(int)i] : JinjaUndefined.Instance;
            }
            case string s when index is long:
            {
                long i = (long)index;
                if (i < 0) i += s.Length;
                return i >= 0 && i < s.Length ? s[(int)i].ToString() : JinjaUndefined.Instance;
            }
            case JinjaNamespace ns: return ns.Values.TryGetValue(Str(index), out var nv) ? nv : JinjaUndefined.Instance;
            case JinjaUndefined: throw new TemplateException($"{source}:{line}: cannot index an undefined value with {Repr(index)}");
            case null: throw new TemplateException($"{source}:{line}: cannot index None with {Repr(index)}");
            default:
                return index is string name ? GetAttr(obj, name) : JinjaUndefined.Instance;
        }
    }

    public static object? Slice(object? obj, object? start, object? stop, object? step, string source, int line)
    {
        int n = obj switch { List<object?> l => l.Count, string s => s.Length, _ => throw new TemplateException($"{source}:{line}: cannot slice {TypeName(obj)}") };
        long st = step is null ? 1 : ToLong(step, source);
        if (st == 0) throw new TemplateException($"{source}:{line}: slice step must not be zero");
        long Norm(object? v, long def)
        {
            if (v is null) return def;
            long i = ToLong(v, source);
            if (i < 0) i += n;
            return st > 0 ? Math.Clamp(i, 0, n) : Math.Clamp(i, -1, n - 1);
        }
        long a = Norm(start, st > 0 ? 0 : n - 1), b = Norm(stop, st > 0 ? n : -1);
        var idx = new List<int>();
        for (long i = a; st > 0 ? i < b : i > b; i += st) idx.Add((int)i);
        return obj is string str ? string.Concat(idx.Select(i => str[i])) : idx.Select(i => ((List<object?>)obj!)[i]).ToList();
    }

    private static JinjaFunction? DictMethod(Dictionary<string, object?> d, string name) => name switch
    {
        "items" => new JinjaFunction((_, _) => d.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList()),
        "keys" => new JinjaFunction((_, _) => d.Keys.Select(k => (object?)k).ToList()),
        "values" => new JinjaFunction((_, _) => d.Values.ToList()),
        "get" => new JinjaFunction((a, _) => a.Count > 0 && d.TryGetValue(Str(a[0]), out var v) ? v : a.Count > 1 ? a[1] : null),
        _ => null,
    };

    private static JinjaFunction? StringMethod(string s, string name) => name switch
    {
        "strip" => new JinjaFunction((a, _) => a.Count > 0 && a[0] is string c ? s.Trim(c.ToCharArray()) : PyStrip(s, true, true)),
        "lstrip" => new JinjaFunction((a, _) => a.Count > 0 && a[0] is string c ? s.TrimStart(c.ToCharArray()) : PyStrip(s, true, false)),
        "rstrip" => new JinjaFunction((a, _) => a.Count > 0 && a[0] is string c ? s.TrimEnd(c.ToCharArray()) : PyStrip(s, false, true)),
        "upper" => new JinjaFunction((_, _) => s.ToUpperInvariant()),
        "lower" => new JinjaFunction((_, _) => s.ToLowerInvariant()),
        "title" => new JinjaFunction((_, _) => Title(s)),
        "capitalize" => new JinjaFunction((_, _) => s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant()),
        "startswith" => new JinjaFunction((a, _) => a.Count > 0 && (a[0] is List<object?> l ? l.Any(x => s.StartsWith(Str(x), StringComparison.Ordinal)) : s.StartsWith(Str(a[0]), StringComparison.Ordinal))),
        "endswith" => new JinjaFunction((a, _) => a.Count > 0 && (a[0] is List<object?> l ? l.Any(x => s.EndsWith(Str(x), StringComparison.Ordinal)) : s.EndsWith(Str(a[0]), StringComparison.Ordinal))),
        "replace" => new JinjaFunction((a, _) => a.Count >= 2 ? s.Replace(Str(a[0]), Str(a[1]), StringComparison.Ordinal) : s),
        "split" => new JinjaFunction((a, _) =>
        {
            if (a.Count == 0 || a[0] is null) return s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(x => (object?)x).ToList();
            var parts = s.Split(Str(a[0]));
            if (a.Count > 1 && a[1] is long max && max >= 0 && parts.Length > max + 1)
                parts = parts.Take((int)max).Append(string.Join(Str(a[0]), parts.Skip((int)max))).ToArray();
            return parts.Select(x => (object?)x).ToList();
        }),
        "format" => new JinjaFunction((a, _) => PercentFormat(s, a)),
        _ => null,
    };

    /// <summary>Python's str.strip() without arguments: Unicode whitespace.</summary>
    private static string PyStrip(string s, bool left, bool right)
    {
        int a = 0, b = s.Length;
        if (left) while (a < b && char.IsWhiteSpace(s[a])) a++;
        if (right) while (b > a && char.IsWhiteSpace(s[b - 1])) b--;
        return s[a..b];
    }

    private static string Title(string s)
    {
        var sb = new StringBuilder(s.Length);
        bool prevLetter = false;
        foreach (char c in s)
        {
            sb.Append(prevLetter ? char.ToLowerInvariant(c) : char.ToUpperInvariant(c));
            prevLetter = char.IsLetter(c);
        }
        return sb.ToString();
    }

    private static string PercentFormat(string fmt, List<object?> args)
    {
        var sb = new StringBuilder();
        int k = 0;
        for (int i = 0; i < fmt.Length; i++)
        {
            if (fmt[i] == '%' && i + 1 < fmt.Length)
            {
                char c = fmt[++i];
                if (c == '%') { sb.Append('%'); continue; }
                sb.Append(k < args.Count ? (c == 'r' ? Repr(args[k++]) : Str(args[k++])) : "");
                continue;
            }
            sb.Append(fmt[i]);
        }
        return sb.ToString();
    }

    // ------------------------------------------------------------------------------------------ operators

    public static object? BinaryOp(string op, object? a, object? b, string source, int line)
    {
        TemplateException Err() => new($"{source}:{line}: cannot apply '{op}' to {TypeName(a)} and {TypeName(b)}");
        switch (op)
        {
            case "==": return Equals(a, b);
            case "!=": return !Equals(a, b);
            case "in": return Contains(b, a, source, line);
            case "notin": return !Contains(b, a, source, line);
            case "~": return Str(a) + Str(b);
            case "<" or ">" or "<=" or ">=":
            {
                int c;
                if (IsNumber(a) && IsNumber(b)) c = ToDouble(a).CompareTo(ToDouble(b));
                else if (a is string sa && b is string sb) c = string.CompareOrdinal(sa, sb);
                else throw Err();
                return op switch { "<" => c < 0, ">" => c > 0, "<=" => c <= 0, _ => c >= 0 };
            }
        }
        if (a is JinjaUndefined || b is JinjaUndefined) throw new TemplateException($"{source}:{line}: an undefined value used with '{op}'");
        if (op == "+")
        {
            if (a is string s1 && b is string s2) return s1 + s2;
            if (a is List<object?> l1 && b is List<object?> l2) return l1.Concat(l2).ToList();
        }
        if (op == "*" && a is string rs && b is long rn) return string.Concat(Enumerable.Repeat(rs, (int)Math.Max(0, rn)));
        if (!IsNumber(a) || !IsNumber(b)) throw Err();
        bool ints = a is long or bool && b is long or bool;
        if (ints)
        {
            long x = ToLong(a, source), y = ToLong(b, source);
            switch (op)
            {
                case "+": return x + y;
                case "-": return x - y;
                case "*": return x * y;
                case "//": if (y == 0) throw new TemplateException($"{source}:{line}: division by zero"); return (long)Math.Floor((double)x / y);
                case "%": if (y == 0) throw new TemplateException($"{source}:{line}: modulo by zero"); return ((x % y) + y) % y;
                case "**": return y >= 0 ? (object)(long)Math.Pow(x, y) : Math.Pow(x, y);
            }
        }
        double p = ToDouble(a), q = ToDouble(b);
        return op switch
        {
            "+" => p + q,
            "-" => p - q,
            "*" => p * q,
            "/" => q == 0 ? throw new TemplateException($"{source}:{line}: division by zero") : p / q,
            "//" => Math.Floor(p / q),
            "%" => p - q * Math.Floor(p / q),
            "**" => Math.Pow(p, q),
            _ => throw Err(),
        };
    }

    private static bool Contains(object? container, object? item, string source, int line) => container switch
    {
        string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw new TemplateException($"{source}:{line}: 'in <string>' needs a string, found {TypeName(item)}"),
        List<object?> l => l.Any(x => Equals(x, item)),
        Dictionary<string, object?> d => item is string k && d.ContainsKey(k),
        JinjaUndefined => throw new TemplateException($"{source}:{line}: 'in' an undefined value"),
        _ => throw new TemplateException($"{source}:{line}: {TypeName(container)} does not support 'in'"),
    };

    // ------------------------------------------------------------------------------------------ filters and tests

    public static object? ApplyFilter(string name, object? v, List<object?> a, Dictionary<string, object?> kw, string source, int line)
    {
        object? Arg(int i, string key, object? def) => i < a.Count ? a[i] : kw.TryGetValue(key, out var x) ? x : def;
        switch (name)
        {
            case "trim": return Arg(0, "chars", null) is string chars ? Str(v).Trim(chars.ToCharArray()) : PyStrip(Str(v), true, true);
            case "upper": return Str(v).ToUpperInvariant();
            case "lower": return Str(v).ToLowerInvariant();
            case "title": return Title(Str(v));
            case "capitalize": { var s = Str(v); return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(); }
            case "string": return Str(v);
            case "int": return v switch { long l => l, double d => (long)d, bool b => b ? 1L : 0L, string s when long.TryParse(s.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var r) => r, _ => Arg(0, "default", 0L) };
            case "float": return v switch { long l => (double)l, double d => d, string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var r) => r, _ => Arg(0, "default", 0.0) };
            case "abs": return v switch { long l => (object)Math.Abs(l), double d => Math.Abs(d), _ => throw new TemplateException($"{source}:{line}: abs of {TypeName(v)}") };
            case "length" or "count":
                return v switch
                {
                    string s => (long)s.Length,
                    List<object?> l => (long)l.Count,
                    Dictionary<string, object?> d => (long)d.Count,
                    JinjaUndefined => 0L,
                    _ => throw new TemplateException($"{source}:{line}: {TypeName(v)} has no length"),
                };
            case "default" or "d":
            {
                bool boolean = Truthy(Arg(1, "boolean", false));
                bool use = v is JinjaUndefined || (boolean && !Truthy(v));
                return use ? Arg(0, "default_value", "") : v;
            }
            case "first": return Iterate(v, source, line).FirstOrDefault(JinjaUndefined.Instance);
            case "last": { var l = Iterate(v, source, line).ToList(); return l.Count > 0 ? l[^1] : JinjaUndefined.Instance; }
            case "list": return Iterate(v, source, line).ToList();
            case "reverse": return v is string rs ? new string(rs.Reverse().ToArray()) : Iterate(v, source, line).Reverse().ToList();
            case "join":
            {
                string sep = Str(Arg(0, "d", ""));
                var attr = Arg(1, "attribute", null);
                return string.Join(sep, Iterate(v, source, line).Select(x => Str(attr is null ? x : GetAttr(x, Str(attr)))));
            }
            case "items":
                return v is Dictionary<string, object?> d2 ? d2.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList()
                    : throw new TemplateException($"{source}:{line}: items of {TypeName(v)}");
            case "replace": return Str(v).Replace(Str(Arg(0, "old", "")), Str(Arg(1, "new", "")), StringComparison.Ordinal);
            case "tojson":
            {
                var indent = Arg(0, "indent", null);
                var sb = new StringBuilder();
                WriteJson(sb, v, indent is long n ? (int)n : -1, 0, source, line);
                return sb.ToString();
            }
            case "map":
            {
                if (kw.TryGetValue("attribute", out var attr)) return Iterate(v, source, line).Select(x => GetAttr(x, Str(attr))).ToList();
                if (a.Count > 0) { string f = Str(a[0]); return Iterate(v, source, line).Select(x => ApplyFilter(f, x, a.Skip(1).ToList(), new(), source, line)).ToList(); }
                throw new TemplateException($"{source}:{line}: map needs a filter name or attribute=");
            }
            case "selectattr" or "rejectattr":
            {
                bool keep = name == "selectattr";
                string attr = Str(Arg(0, "attribute", ""));
                string? test = a.Count > 1 ? Str(a[1]) : null;
                var targs = a.Skip(2).ToList();
                return Iterate(v, source, line).Where(x =>
                {
                    var av = GetAttr(x, attr);
                    bool ok = test is null ? Truthy(av) : ApplyTest(test, av, targs, source, line);
                    return ok == keep;
                }).ToList();
            }
            case "select" or "reject":
            {
                bool keep = name == "select";
                string? test = a.Count > 0 ? Str(a[0]) : null;
                var targs = a.Skip(1).ToList();
                return Iterate(v, source, line).Where(x => (test is null ? Truthy(x) : ApplyTest(test, x, targs, source, line)) == keep).ToList();
            }
            case "unique":
            {
                var list = new List<object?>();
                foreach (var x in Iterate(v, source, line)) if (!list.Any(y => Equals(x, y))) list.Add(x);
                return list;
            }
            case "indent":
            {
                int width = (int)ToLong(Arg(0, "width", 4L), source);
                bool first = Truthy(Arg(1, "first", false));
                string pad = new(' ', width);
                var lines = Str(v).Split('\n');
                for (int i = 0; i < lines.Length; i++) if ((i > 0 || first) && lines[i].Length > 0) lines[i] = pad + lines[i];
                return string.Join('\n', lines);
            }
            default:
                throw new TemplateException($"{source}:{line}: unsupported filter '{name}'");
        }
    }

    public static bool ApplyTest(string name, object? v, List<object?> a, string source, int line) => name switch
    {
        "defined" => v is not JinjaUndefined,
        "undefined" => v is JinjaUndefined,
        "none" => v is null,
        "string" => v is string,
        "number" => v is long or double,
        "integer" => v is long,
        "float" => v is double,
        "boolean" => v is bool,
        "true" => v is true,
        "false" => v is false,
        "mapping" => v is Dictionary<string, object?>,
        "sequence" => v is List<object?> or string,
        "iterable" => v is List<object?> or string or Dictionary<string, object?>,
        "callable" => v is JinjaFunction,
        "equalto" or "eq" or "==" or "sameas" => a.Count > 0 && Equals(v, a[0]),
        "ne" or "!=" => a.Count > 0 && !Equals(v, a[0]),
        "in" => a.Count > 0 && Contains(a[0], v, source, line),
        "odd" => ToLong(v, source) % 2 != 0,
        "even" => ToLong(v, source) % 2 == 0,
        "divisibleby" => a.Count > 0 && ToLong(v, source) % ToLong(a[0], source) == 0,
        "lower" => v is string s && s == s.ToLowerInvariant(),
        "upper" => v is string s2 && s2 == s2.ToUpperInvariant(),
        _ => throw new TemplateException($"{source}:{line}: unsupported test '{name}'"),
    };

    /// <summary>Python's json.dumps(v, ensure_ascii=False, indent=indent) as transformers' tojson filter calls it (keys in insertion order).</summary>
    public static void WriteJson(StringBuilder sb, object? v, int indent, int depth, string source, int line)
    {
        string Nl(int d) => indent < 0 ? "" : "\n" + new string(' ', indent * d);
        string itemSep = indent < 0 ? ", " : ",";
        switch (v)
        {
            case null: sb.Append("null"); break;
            case bool b: sb.Append(b ? "true" : "false"); break;
            case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); break;
            case double d: sb.Append(double.IsNaN(d) ? "NaN" : double.IsInfinity(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatRepr(d)); break;
            case string s: JsonString(sb, s); break;
            case List<object?> list:
                if (list.Count == 0) { sb.Append("[]"); break; }
                sb.Append('[');
                for (int i = 0; i < list.Count; i++)
                {
                    if (i > 0) sb.Append(itemSep);
                    sb.Append(Nl(depth + 1));
                    WriteJson(sb, list[i], indent, depth + 1, source, line);
                }
                sb.Append(Nl(depth)).Append(']');
                break;
            case Dictionary<string, object?> dict:
                if (dict.Count == 0) { sb.Append("{}"); break; }
                sb.Append('{');
                int k = 0;
                foreach (var (key, val) in dict)
                {
                    if (k++ > 0) sb.Append(itemSep);
                    sb.Append(Nl(depth + 1));
                    JsonString(sb, key);
                    sb.Append(": ");
                    WriteJson(sb, val, indent, depth + 1, source, line);
                }
                sb.Append(Nl(depth)).Append('}');
                break;
            case JinjaUndefined: throw new TemplateException($"{source}:{line}: tojson of an undefined value");
            default: throw new TemplateException($"{source}:{line}: tojson cannot write {TypeName(v)}");
        }
    }

    private static void JsonString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
