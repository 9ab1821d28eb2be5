using System.Globalization;
using System.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>An error in a chat template (syntax or evaluation), or raised by the template's own raise_exception.</summary>
public sealed class TemplateException(string message) : Exception(message);

/// <summary>The undefined value (a missing variable, key or attribute): prints as "", is false, is not "defined".</summary>
public sealed class JinjaUndefined
{
    public static readonly JinjaUndefined Instance = new();
    private JinjaUndefined() { }
    public override string ToString() => "";
}

/// <summary>The object made by namespace(): attributes assignable from inside loops (<c>{% set ns.x = 1 %}</c>).</summary>
public sealed class JinjaNamespace
{
    public Dictionary<string, object?> Values { get; } = new();
}

/// <summary>A callable exposed to templates (raise_exception, namespace, range, strftime_now).</summary>
public delegate object? JinjaFunction(List<object?> args, Dictionary<string, object?> kwargs);

/// <summary>
/// The subset of Jinja2 that Hugging Face chat templates use, evaluated the way transformers' apply_chat_template
/// does (jinja2 sandbox with trim_blocks and lstrip_blocks, tojson without key sorting, raise_exception).
/// </summary>
/// <remarks>
/// Statements: if/elif/else, for (with loop.index/index0/first/last/length/revindex/revindex0/previtem/nextitem,
/// an inline "if" filter, else, break, continue), set (names, tuples, namespace attributes), set blocks, macro
/// with call, comments, whitespace control (-), trim_blocks and lstrip_blocks. Expressions: Python literals,
/// lists, dicts, tuples, attribute and item access, slices, calls, filters, tests (is / is not), ~ concatenation,
/// arithmetic, comparisons, in / not in, and / or / not, conditional expressions. Values are Python-like:
/// null (None), bool, long, double, string, List, Dictionary, and <see cref="JinjaUndefined"/>.
/// Written from Jinja2's documented grammar (operator precedence of jinja2/parser.py); no code is shared with it.
/// </remarks>
public sealed class JinjaTemplate
{
    private readonly List<Node> _body;
    public string Source { get; }

    private JinjaTemplate(List<Node> body, string source) { _body = body; Source = source; }

    public static JinjaTemplate Parse(string text, string source = "template")
    {
        var tokens = Lexer.Tokenize(text, source);
        var parser = new Parser(tokens, source);
        var body = parser.ParseBody(out string? end);
        if (end is not null) throw new TemplateException($"{source}: unexpected {{% {end} %}}");
        return new JinjaTemplate(body, source);
    }

    /// <summary>
    /// A JSON value as a template value the way Python's json.loads gives it: object = dict (key order kept),
    /// array = list, integer literal = long, other number = double, string, bool, null = None.
    /// </summary>
    public static object? FromJson(System.Text.Json.JsonElement e) => e.ValueKind switch
    {
        System.Text.Json.JsonValueKind.Object => e.EnumerateObject().ToDictionary(p => p.Name, p => FromJson(p.Value)),
        System.Text.Json.JsonValueKind.Array => e.EnumerateArray().Select(FromJson).ToList(),
        System.Text.Json.JsonValueKind.String => e.GetString(),
        System.Text.Json.JsonValueKind.Number => e.TryGetInt64(out long l) && e.GetRawText().IndexOfAny(['.', 'e', 'E']) < 0 ? (object)l : e.GetDouble(),
        System.Text.Json.JsonValueKind.True => true,
        System.Text.Json.JsonValueKind.False => false,
        _ => null,
    };

    public string Render(IReadOnlyDictionary<string, object?> variables)
    {
        var ctx = new Context(Source);
        ctx.Scopes.Add(new Dictionary<string, object?>(Builtins.Globals(Source)));
        ctx.Scopes.Add(new Dictionary<string, object?>(variables));
        var sb = new StringBuilder();
        try { Exec(_body, ctx, sb); }
        catch (LoopControl) { throw new TemplateException($"{Source}: break or continue outside a loop"); }
        return sb.ToString();
    }

    // ------------------------------------------------------------------------------------------ lexer

    private enum T { Text, VarStart, VarEnd, BlockStart, BlockEnd, Name, String, Int, Float, Op, Eof }

    private readonly record struct Tok(T Kind, string Value, int Line);

    private static class Lexer
    {
        private static readonly string[] Ops = { "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|" };

        public static List<Tok> Tokenize(string s, string source)
        {
            var toks = new List<Tok>();
            int i = 0, line = 1;
            bool trimNextNewline = false, lstripNext = false;
            while (i < s.Length)
            {
                int open = FindTagStart(s, i);
                string text = open < 0 ? s[i..] : s[i..open];
                if (trimNextNewline)
                {
                    // trim_blocks: the first newline after a block tag goes
                    if (text.StartsWith("\r\n", StringComparison.Ordinal)) text = text[2..];
                    else if (text.StartsWith('\n')) text = text[1..];
                }
                if (lstripNext) text = text.TrimStart();
                trimNextNewline = lstripNext = false;
                if (open >= 0)
                {
                    char kind = s[open + 1];
                    bool minus = open + 2 < s.Length && s[open + 2] == '-';
                    bool plus = open + 2 < s.Length && s[open + 2] == '+';
                    if (minus) text = text.TrimEnd();
                    else if (kind is '%' or '#' && !plus)
                    {
                        // lstrip_blocks: spaces and tabs from the line start to a block or comment tag go (the line
                        // start judged on the source, so a newline eaten by trim_blocks still starts a line)
                        int k = open;
                        while (k > i && s[k - 1] is ' ' or '\t') k--;
                        if (k == 0 || s[k - 1] == '\n')
                        {
                            int n = 0;
                            while (n < text.Length && text[text.Length - 1 - n] is ' ' or '\t') n++;
                            text = text[..(text.Length - n)];
                        }
                    }
                }
                if (text.Length > 0) toks.Add(new Tok(T.Text, text, line));
                line += Count(s, i, open < 0 ? s.Length : open);
                if (open < 0) break;

                char k2 = s[open + 1];
                int p = open + 2;
                if (p < s.Length && (s[p] == '-' || s[p] == '+')) p++;
                if (k2 == '#')
                {
                    int close = s.IndexOf("#}", p, StringComparison.Ordinal);
                    if (close < 0) throw new TemplateException($"{source}:{line}: unclosed comment");
                    bool m = s[close - 1] == '-';
                    line += Count(s, open, close + 2);
                    i = close + 2;
                    if (m) lstripNext = true; else trimNextNewline = true;
                    continue;
                }
                toks.Add(new Tok(k2 == '{' ? T.VarStart : T.BlockStart, "", line));
                string endTag = k2 == '{' ? "}}" : "%}";
                // expression tokens up to the closing tag
                while (true)
                {
                    while (p < s.Length && char.IsWhiteSpace(s[p])) { if (s[p] == '\n') line++; p++; }
                    if (p >= s.Length) throw new TemplateException($"{source}:{line}: unclosed tag (expected {endTag})");
                    if ((s[p] == '-' || s[p] == '+') && string.CompareOrdinal(s, p + 1, endTag, 0, 2) == 0)
                    {
                        toks.Add(new Tok(k2 == '{' ? T.VarEnd : T.BlockEnd, "", line));
                        if (s[p] == '-') lstripNext = true;
                        else if (k2 == '%') trimNextNewline = false;
                        p += 3;
                        break;
                    }
                    if (string.CompareOrdinal(s, p, endTag, 0, 2) == 0)
                    {
                        toks.Add(new Tok(k2 == '{' ? T.VarEnd : T.BlockEnd, "", line));
                        if (k2 == '%') trimNextNewline = true;
                        p += 2;
                        break;
                    }
                    char c = s[p];
                    if (c is '\'' or '"')
                    {
                        var sb = new StringBuilder();
                        int q = p + 1;
                        while (q < s.Length && s[q] != c)
                        {
                            if (s[q] == '\\' && q + 1 < s.Length)
                            {
                                q++;
                                switch (s[q])
                                {
                                    case 'n': sb.Append('\n'); break;
                                    case 't': sb.Append('\t'); break;
                                    case 'r': sb.Append('\r'); break;
                                    case '\\': sb.Append('\\'); break;
                                    case '\'': sb.Append('\''); break;
                                    case '"': sb.Append('"'); break;
                                    case 'u' when q + 4 < s.Length:
                                        sb.Append((char)int.Parse(s.AsSpan(q + 1, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture));
                                        q += 4;
                                        break;
                                    default: sb.Append('\\').Append(s[q]); break;
                                }
                                q++;
                                continue;
                            }
                            if (s[q] == '\n') line++;
                            sb.Append(s[q++]);
                        }
                        if (q >= s.Length) throw new TemplateException($"{source}:{line}: unterminated string");
                        toks.Add(new Tok(T.String, sb.ToString(), line));
                        p = q + 1;
                    }
                    else if (char.IsDigit(c))
                    {
                        int q = p;
                        while (q < s.Length && (char.IsDigit(s[q]) || s[q] == '_')) q++;
                        bool isFloat = q + 1 < s.Length && s[q] == '.' && char.IsDigit(s[q + 1]);
                        if (isFloat) { q++; while (q < s.Length && char.IsDigit(s[q])) q++; }
                        toks.Add(new Tok(isFloat ? T.Float : T.Int, s[p..q].Replace("_", ""), line));
                        p = q;
                    }
                    else if (char.IsLetter(c) || c == '_')
                    {
                        int q = p;
                        while (q < s.Length && (char.IsLetterOrDigit(s[q]) || s[q] == '_')) q++;
                        toks.Add(new Tok(T.Name, s[p..q], line));
                        p = q;
                    }
                    else
                    {
                        string? op = null;
                        foreach (var o in Ops) if (string.CompareOrdinal(s, p, o, 0, o.Length) == 0) { op = o; break; }
                        if (op is null) throw new TemplateException($"{source}:{line}: unexpected character '{c}'");
                        toks.Add(new Tok(T.Op, op, line));
                        p += op.Length;
                    }
                }
                i = p;
            }
            toks.Add(new Tok(T.Eof, "", line));
            return toks;
        }

        private static int FindTagStart(string s, int from)
        {
            for (int i = from; i + 1 < s.Length; i++)
                if (s[i] == '{' && s[i + 1] is '{' or '%' or '#') return i;
            return -1;
        }

        private static int Count(string s, int a, int b)
        {
            int n = 0;
            for (int i = a; i < b; i++) if (s[i] == '\n') n++;
            return n;
        }
    }

    // ------------------------------------------------------------------------------------------ syntax tree

    private abstract record Node(int Line);
    private sealed record TextNode(string Text, int Line) : Node(Line);
    private sealed record OutputNode(Expr Value, int Line) : Node(Line);
    private sealed record IfNode(List<(Expr? Cond, List<Node> Body)> Branches, int Line) : Node(Line);
    private sealed record ForNode(List<string> Targets, Expr Iter, Expr? Filter, List<Node> Body, List<Node>? Else, int Line) : Node(Line);
    private sealed record SetNode(List<string> Targets, string? Attr, Expr? Value, List<Node>? Block, int Line) : Node(Line);
    private sealed record MacroNode(string Name, List<(string Name, Expr? Default)> Params, List<Node> Body, int Line) : Node(Line);
    private sealed record LoopControlNode(bool IsBreak, int Line) : Node(Line);

    private abstract record Expr(int Line);
    private sealed record Literal(object? Value, int Line) : Expr(Line);
    private sealed record Name(string Id, int Line) : Expr(Line);
    private sealed record ListExpr(List<Expr> Items, int Line) : Expr(Line);
    private sealed record DictExpr(List<(Expr Key, Expr Value)> Items, int Line) : Expr(Line);
    private sealed record GetAttr(Expr Obj, string Attr, int Line) : Expr(Line);
    private sealed record GetItem(Expr Obj, Expr Index, int Line) : Expr(Line);
    private sealed record SliceExpr(Expr Obj, Expr? Start, Expr? Stop, Expr? Step, int Line) : Expr(Line);
    private sealed record Call(Expr Fn, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line) : Expr(Line);
    private sealed record Filter(Expr Value, string Name, List<Expr> Args, List<(string Name, Expr Value)> Kwargs, int Line) : Expr(Line);
    private sealed record Test(Expr Value, string Name, List<Expr> Args, bool Negated, int Line) : Expr(Line);
    private sealed record Unary(string Op, Expr Operand, int Line) : Expr(Line);
    private sealed record Binary(string Op, Expr Left, Expr Right, int Line) : Expr(Line);
    private sealed record CondExpr(Expr Cond, Expr Then, Expr? Else, int Line) : Expr(Line);

    // ------------------------------------------------------------------------------------------ parser

    private sealed class Parser(List<Tok> toks, string source)
    {
        private int _p;
        private Tok Cur => toks[_p];
        private Tok Next() => toks[_p++];
        private TemplateException Error(string msg) => new($"{source}:{Cur.Line}: {msg}");
        private bool IsName(string n) => Cur.Kind == T.Name && Cur.Value == n;
        private bool IsOp(string o) => Cur.Kind == T.Op && Cur.Value == o;
        private void ExpectOp(string o) { if (!IsOp(o)) throw Error($"expected '{o}', found '{Cur.Value}'"); _p++; }
        private string ExpectName() { if (Cur.Kind != T.Name) throw Error($"expected a name, found '{Cur.Value}'"); return Next().Value; }
        private void ExpectBlockEnd() { if (Cur.Kind != T.BlockEnd) throw Error($"expected %}}, found '{Cur.Value}'"); _p++; }

        /// <summary>Nodes up to an end/else-like block tag, whose keyword is returned (its name consumed, not the rest).</summary>
        public List<Node> ParseBody(out string? endKeyword, params string[] stops)
        {
            var nodes = new List<Node>();
            while (true)
            {
                var t = Cur;
                switch (t.Kind)
                {
                    case T.Eof:
                        endKeyword = null;
                        return nodes;
                    case T.Text:
                        nodes.Add(new TextNode(t.Value, t.Line));
                        _p++;
                        break;
                    case T.VarStart:
                        _p++;
                        nodes.Add(new OutputNode(ParseExpression(), t.Line));
                        if (Cur.Kind != T.VarEnd) throw Error($"expected }}}}, found '{Cur.Value}'");
                        _p++;
                        break;
                    case T.BlockStart:
                        _p++;
                        string kw = ExpectName();
                        if (stops.Contains(kw)) { endKeyword = kw; return nodes; }
                        nodes.Add(ParseStatement(kw, t.Line));
                        break;
                    default:
                        throw Error($"unexpected '{t.Value}'");
                }
            }
        }

        private List<Node> Until(string what, out string end, params string[] stops)
        {
            var body = ParseBody(out string? e, stops);
            end = e ?? throw new TemplateException($"{source}: missing {{% {stops[^1]} %}} for {what}");
            return body;
        }

        private Node ParseStatement(string kw, int line)
        {
            switch (kw)
            {
                case "if":
                {
                    var branches = new List<(Expr?, List<Node>)>();
                    Expr? cond = ParseExpression();
                    ExpectBlockEnd();
                    while (true)
                    {
                        var body = Until("if", out string end, "elif", "else", "endif");
                        branches.Add((cond, body));
                        if (end == "endif") { ExpectBlockEnd(); break; }
                        if (end == "elif") { cond = ParseExpression(); ExpectBlockEnd(); }
                        else { ExpectBlockEnd(); branches.Add((null, Until("if", out _, "endif"))); ExpectBlockEnd(); break; }
                    }
                    return new IfNode(branches, line);
                }
                case "for":
                {
                    var targets = new List<string> { ExpectName() };
                    while (IsOp(",")) { _p++; targets.Add(ExpectName()); }
                    if (!IsName("in")) throw Error("expected 'in'");
                    _p++;
                    var iter = ParseExpression(noCondExpr: true);
                    Expr? filter = null;
                    if (IsName("if")) { _p++; filter = ParseExpression(noCondExpr: true); }
                    if (IsName("recursive")) throw Error("recursive loops are not supported");
                    ExpectBlockEnd();
                    var body = Until("for", out string end, "else", "endfor");
                    List<Node>? els = null;
                    ExpectBlockEnd();
                    if (end == "else") { els = Until("for", out _, "endfor"); ExpectBlockEnd(); }
                    return new ForNode(targets, iter, filter, body, els, line);
                }
                case "set":
                {
                    var targets = new List<string> { ExpectName() };
                    string? attr = null;
                    if (IsOp(".")) { _p++; attr = ExpectName(); }
                    while (IsOp(",")) { _p++; targets.Add(ExpectName()); }
                    if (Cur.Kind == T.BlockEnd)
                    {
                        _p++;
                        var block = Until("set", out _, "endset");
                        ExpectBlockEnd();
                        return new SetNode(targets, attr, null, block, line);
                    }
                    ExpectOp("=");
                    var value = ParseTupleOrExpression();
                    ExpectBlockEnd();
                    return new SetNode(targets, attr, value, null, line);
                }
                case "macro":
                {
                    string name = ExpectName();
                    ExpectOp("(");
                    var ps = new List<(string, Expr?)>();
                    while (!IsOp(")"))
                    {
                        string pn = ExpectName();
                        Expr? def = null;
                        if (IsOp("=")) { _p++; def = ParseExpression(); }
                        ps.Add((pn, def));
                        if (IsOp(",")) _p++;
                    }
                    _p++;
                    ExpectBlockEnd();
                    var body = Until("macro", out _, "endmacro");
                    ExpectBlockEnd();
                    return new MacroNode(name, ps, body, line);
                }
                case "break":
                case "continue":
                    ExpectBlockEnd();
                    return new LoopControlNode(kw == "break", line);
                case "generation":
                {
                    // transformers' AssistantTracker marks assistant text; here it renders its body unchanged
                    ExpectBlockEnd();
                    var body = Until("generation", out _, "endgeneration");
                    ExpectBlockEnd();
                    return new IfNode(new List<(Expr?, List<Node>)> { (null, body) }, line);
                }
                default:
                    throw new TemplateException($"{source}:{line}: unsupported statement '{kw}'");
            }
        }

        private Expr ParseTupleOrExpression()
        {
            var first = ParseExpression();
            if (!IsOp(",")) return first;
            var items = new List<Expr> { first };
            while (IsOp(",")) { _p++; items.Add(ParseExpression()); }
            return new ListExpr(items, first.Line);
        }

        public Expr ParseExpression(bool noCondExpr = false)
        {
            var e = ParseOr();
            if (noCondExpr) return e;
            while (IsName("if"))
            {
                _p++;
                var cond = ParseOr();
                Expr? els = null;
                if (IsName("else")) { _p++; els = ParseExpression(); }
                e = new CondExpr(cond, e, els, e.Line);
            }
            return e;
        }

        private Expr ParseOr()
        {
            var e = ParseAnd();
            while (IsName("or")) { _p++; e = new Binary("or", e, ParseAnd(), e.Line); }
            return e;
        }

        private Expr ParseAnd()
        {
            var e = ParseNot();
            while (IsName("and")) { _p++; e = new Binary("and", e, ParseNot(), e.Line); }
            return e;
        }

        private Expr ParseNot()
        {
            if (IsName("not")) { int l = Next().Line; return new Unary("not", ParseNot(), l); }
            return ParseCompare();
        }

        private Expr ParseCompare()
        {
            var e = ParseMath1();
            while (true)
            {
                if (Cur.Kind == T.Op && Cur.Value is "==" or "!=" or "<" or ">" or "<=" or ">=")
                {
                    string op = Next().Value;
                    e = new Binary(op, e, ParseMath1(), e.Line);
                }
                else if (IsName("in")) { _p++; e = new Binary("in", e, ParseMath1(), e.Line); }
                else if (IsName("not") && toks[_p + 1].Kind == T.Name && toks[_p + 1].Value == "in")
                {
                    _p += 2;
                    e = new Binary("notin", e, ParseMath1(), e.Line);
                }
                else return e;
            }
        }

        private Expr ParseMath1()
        {
            var e = ParseConcat();
            while (Cur.Kind == T.Op && Cur.Value is "+" or "-") { string op = Next().Value; e = new Binary(op, e, ParseConcat(), e.Line); }
            return e;
        }

        private Expr ParseConcat()
        {
            var e = ParseMath2();
            while (IsOp("~")) { _p++; e = new Binary("~", e, ParseMath2(), e.Line); }
            return e;
        }

        private Expr ParseMath2()
        {
            var e = ParsePow();
            while (Cur.Kind == T.Op && Cur.Value is "*" or "/" or "//" or "%") { string op = Next().Value; e = new Binary(op, e, ParsePow(), e.Line); }
            return e;
        }

        private Expr ParsePow()
        {
            var e = ParseUnary(withFilter: true);
            while (IsOp("**")) { _p++; e = new Binary("**", e, ParseUnary(withFilter: true), e.Line); }
            return e;
        }

        private Expr ParseUnary(bool withFilter)
        {
            Expr e;
            if (Cur.Kind == T.Op && Cur.Value is "-" or "+")
            {
                var t = Next();
                e = new Unary(t.Value, ParseUnary(withFilter: false), t.Line);
            }
            else e = ParsePostfix(ParsePrimary());
            return withFilter ? ParseFilterExpr(e) : e;
        }

        private Expr ParsePrimary()
        {
            var t = Next();
            switch (t.Kind)
            {
                case T.String:
                {
                    string s = t.Value;
                    while (Cur.Kind == T.String) s += Next().Value; // adjacent literals concatenate
                    return new Literal(s, t.Line);
                }
                case T.Int: return new Literal(long.Parse(t.Value, CultureInfo.InvariantCulture), t.Line);
                case T.Float: return new Literal(double.Parse(t.Value, CultureInfo.InvariantCulture), t.Line);
                case T.Name:
                    return t.Value switch
                    {
                        "true" or "True" => new Literal(true, t.Line),
                        "false" or "False" => new Literal(false, t.Line),
                        "none" or "None" => new Literal(null, t.Line),
                        _ => new Name(t.Value, t.Line),
                    };
                case T.Op when t.Value == "(":
                {
                    if (IsOp(")")) { _p++; return new ListExpr(new List<Expr>(), t.Line); }
                    var e = ParseExpression();
                    if (IsOp(","))
                    {
                        var items = new List<Expr> { e };
                        while (IsOp(",")) { _p++; if (IsOp(")")) break; items.Add(ParseExpression()); }
                        e = new ListExpr(items, t.Line);
                    }
                    ExpectOp(")");
                    return e;
                }
                case T.Op when t.Value == "[":
                {
                    var items = new List<Expr>();
                    while (!IsOp("]")) { items.Add(ParseExpression()); if (!IsOp("]")) ExpectOp(","); }
                    _p++;
                    return new ListExpr(items, t.Line);
                }
                case T.Op when t.Value == "{":
                {
                    var items = new List<(Expr, Expr)>();
                    while (!IsOp("}"))
                    {
                        var k = ParseExpression();
                        ExpectOp(":");
                        items.Add((k, ParseExpression()));
                        if (!IsOp("}")) ExpectOp(",");
                    }
                    _p++;
                    return new DictExpr(items, t.Line);
                }
                default:
                    _p--;
                    throw Error($"unexpected '{(t.Kind == T.BlockEnd ? "%}" : t.Kind == T.VarEnd ? "}}" : t.Value)}' in an expression");
            }
        }

        private Expr ParsePostfix(Expr e)
        {
            while (true)
            {
                if (IsOp("."))
                {
                    _p++;
                    if (Cur.Kind == T.Int) e = new GetItem(e, new Literal(long.Parse(Next().Value, CultureInfo.InvariantCulture), e.Line), e.Line);
                    else e = new GetAttr(e, ExpectName(), e.Line);
                }
                else if (IsOp("["))
                {
                    _p++;
                    Expr? a = null, b = null, c = null;
                    bool slice = false;
                    if (!IsOp(":")) a = ParseExpression();
                    if (IsOp(":"))
                    {
                        slice = true;
                        _p++;
                        if (!IsOp("]") && !IsOp(":")) b = ParseExpression();
                        if (IsOp(":")) { _p++; if (!IsOp("]")) c = ParseExpression(); }
                    }
                    ExpectOp("]");
                    e = slice ? new SliceExpr(e, a, b, c, e.Line) : new GetItem(e, a!, e.Line);
                }
                else if (IsOp("("))
                {
                    var (args, kwargs) = ParseArgs();
                    e = new Call(e, args, kwargs, e.Line);
                }
                else return e;
            }
        }

        private (List<Expr>, List<(string, Expr)>) ParseArgs()
        {
            ExpectOp("(");
            var args = new List<Expr>();
            var kwargs = new List<(string, Expr)>();
            while (!IsOp(")"))
            {
                if (Cur.Kind == T.Name && toks[_p + 1].Kind == T.Op && toks[_p + 1].Value == "=")
                {
                    string n = Next().Value;
                    _p++;
                    kwargs.Add((n, ParseExpression()));
                }
                else args.Add(ParseExpression());
                if (!IsOp(")")) ExpectOp(",");
            }
            _p++;
            return (args, kwargs);
        }

        private Expr ParseFilterExpr(Expr e)
        {
            while (true)
            {
                if (IsOp("|"))
                {
                    _p++;
                    string name = ExpectName();
                    var (args, kwargs) = IsOp("(") ? ParseArgs() : (new List<Expr>(), new List<(string, Expr)>());
                    e = new Filter(e, name, args, kwargs, e.Line);
                }
                else if (IsName("is"))
                {
                    _p++;
                    bool neg = false;
                    if (IsName("not")) { _p++; neg = true; }
                    string name = ExpectName();
                    var args = new List<Expr>();
                    if (IsOp("(")) args = ParseArgs().Item1;
                    else if (Cur.Kind is T.String or T.Int or T.Float || (Cur.Kind == T.Name && Cur.Value is not ("and" or "or" or "else" or "if" or "in" or "not")))
                        args.Add(ParsePostfix(ParsePrimary()));
                    e = new Test(e, name, args, neg, e.Line);
                }
                else if (IsOp("("))
                {
                    var (args, kwargs) = ParseArgs();
                    e = new Call(e, args, kwargs, e.Line);
                }
                else return e;
            }
        }
    }

    // ------------------------------------------------------------------------------------------ evaluation

    private sealed class LoopControl(bool isBreak) : Exception { public bool IsBreak { get; } = isBreak; }

    private sealed class Context(string source)
    {
        public string Source { get; } = source;
        public List<Dictionary<string, object?>> Scopes { get; } = new();

        public object? Lookup(string name)
        {
            for (int i = Scopes.Count - 1; i >= 0; i--)
                if (Scopes[i].TryGetValue(name, out var v)) return v;
            return JinjaUndefined.Instance;
        }

        public TemplateException Error(int line, string msg) => new($"{Source}:{line}: {msg}");
    }

    private sealed class Macro(MacroNode node, JinjaTemplate owner, List<Dictionary<string, object?>> closure)
    {
        public object? Invoke(List<object?> args, Dictionary<string, object?> kwargs)
        {
            var ctx = new Context(owner.Source);
            ctx.Scopes.AddRange(closure);
            var scope = new Dictionary<string, object?>();
            for (int i = 0; i < node.Params.Count; i++)
            {
                var (n, def) = node.Params[i];
                scope[n] = i < args.Count ? args[i] : kwargs.TryGetValue(n, out var kv) ? kv : def is null ? JinjaUndefined.Instance : owner.Eval(def, ctx);
            }
            ctx.Scopes.Add(scope);
            var sb = new StringBuilder();
            owner.Exec(node.Body, ctx, sb);
            return sb.ToString();
        }
    }

    private void Exec(List<Node> nodes, Context ctx, StringBuilder sb)
    {
        foreach (var n in nodes)
        {
            switch (n)
            {
                case TextNode t: sb.Append(t.Text); break;
                case OutputNode o: sb.Append(Builtins.Str(Eval(o.Value, ctx))); break;
                case IfNode i:
                    foreach (var (cond, body) in i.Branches)
                        if (cond is null || Builtins.Truthy(Eval(cond, ctx))) { Exec(body, ctx, sb); break; }
                    break;
                case ForNode f: ExecFor(f, ctx, sb); break;
                case SetNode s:
                {
                    object? value = s.Value is not null ? Eval(s.Value, ctx) : RenderBlock(s.Block!, ctx);
                    if (s.Attr is not null)
                    {
                        if (ctx.Lookup(s.Targets[0]) is not JinjaNamespace ns) throw ctx.Error(s.Line, $"'{s.Targets[0]}' is not a namespace; cannot set .{s.Attr}");
                        ns.Values[s.Attr] = value;
                    }
                    else Assign(ctx.Scopes[^1], s.Targets, value, ctx, s.Line);
                    break;
                }
                case MacroNode m:
                {
                    var macro = new Macro(m, this, new List<Dictionary<string, object?>>(ctx.Scopes));
                    ctx.Scopes[^1][m.Name] = new JinjaFunction(macro.Invoke);
                    break;
                }
                case LoopControlNode lc: throw new LoopControl(lc.IsBreak);
            }
        }
    }

    private string RenderBlock(List<Node> block, Context ctx)
    {
        var sb = new StringBuilder();
        Exec(block, ctx, sb);
        return sb.ToString();
    }

    private static void Assign(Dictionary<string, object?> scope, List<string> targets, object? value, Context ctx, int line)
    {
        if (targets.Count == 1) { scope[targets[0]] = value; return; }
        var items = Builtins.Iterate(value, ctx.Source, line).ToList();
        if (items.Count != targets.Count) throw ctx.Error(line, $"cannot unpack {items.Count} values into {targets.Count} names");
        for (int i = 0; i < targets.Count; i++) scope[targets[i]] = items[i];
    }

    private void ExecFor(ForNode f, Context ctx, StringBuilder sb)
    {
        var items = Builtins.Iterate(Eval(f.Iter, ctx), ctx.Source, f.Line).ToList();
        if (f.Filter is not null)
        {
            var kept = new List<object?>();
            foreach (var it in items)
            {
                var probe = new Dictionary<string, object?>();
                Assign(probe, f.Targets, it, ctx, f.Line);
                ctx.Scopes.Add(probe);
                try { if (Builtins.Truthy(Eval(f.Filter, ctx))) kept.Add(it); }
                finally { ctx.Scopes.RemoveAt(ctx.Scopes.Count - 1); }
            }
            items = kept;
        }
        if (items.Count == 0)
        {
            if (f.Else is not null) Exec(f.Else, ctx, sb);
            return;
        }
        for (int i = 0; i < items.Count; i++)
        {
            var loop = new Dictionary<string, object?>
            {
                ["index"] = (long)(i + 1), ["index0"] = (long)i, ["first"] = i == 0, ["last"] = i == items.Count - 1,
                ["length"] = (long)items.Count, ["revindex"] = (long)(items.Count - i), ["revindex0"] = (long)(items.Count - i - 1),
                ["previtem"] = i > 0 ? items[i - 1] : JinjaUndefined.Instance,
                ["nextitem"] = i + 1 < items.Count ? items[i + 1] : JinjaUndefined.Instance,
            };
            var scope = new Dictionary<string, object?> { ["loop"] = loop };
            Assign(scope, f.Targets, items[i], ctx, f.Line);
            ctx.Scopes.Add(scope);
            try { Exec(f.Body, ctx, sb); }
            catch (LoopControl lc) { if (lc.IsBreak) break; }
            finally { ctx.Scopes.RemoveAt(ctx.Scopes.Count - 1); }
        }
    }

    private object? Eval(Expr e, Context ctx)
    {
        switch (e)
        {
            case Literal l: return l.Value;
            case Name n: return ctx.Lookup(n.Id);
            case ListExpr l: return l.Items.Select(x => Eval(x, ctx)).ToList();
            case DictExpr d:
            {
                var dict = new Dictionary<string, object?>();
                foreach (var (k, v) in d.Items) dict[Builtins.Str(Eval(k, ctx))] = Eval(v, ctx);
                return dict;
            }
            case GetAttr g: return Builtins.GetAttr(Eval(g.Obj, ctx), g.Attr);
            case GetItem g: return Builtins.GetItem(Eval(g.Obj, ctx), Eval(g.Index, ctx), ctx.Source, g.Line);
            case SliceExpr s:
                return Builtins.Slice(Eval(s.Obj, ctx), s.Start is null ? null : Eval(s.Start, ctx), s.Stop is null ? null : Eval(s.Stop, ctx),
                    s.Step is null ? null : Eval(s.Step, ctx), ctx.Source, s.Line);
            case Call c:
            {
                var fn = Eval(c.Fn, ctx);
                var args = c.Args.Select(a => Eval(a, ctx)).ToList();
                var kwargs = c.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, ctx));
                if (fn is JinjaFunction f) return f(args, kwargs);
                // jinja2 says this (UndefinedError) when a method is missing, e.g. None.strip() for a None content
                if (fn is JinjaUndefined && c.Fn is GetAttr ga)
                    throw ctx.Error(c.Line, $"'{Builtins.ObjectTypeRepr(Eval(ga.Obj, ctx))}' has no attribute '{ga.Attr}'");
                throw ctx.Error(c.Line, $"{Describe(c.Fn)} is not callable");
            }
            case Filter f:
            {
                var v = Eval(f.Value, ctx);
                var args = f.Args.Select(a => Eval(a, ctx)).ToList();
                var kwargs = f.Kwargs.ToDictionary(k => k.Name, k => Eval(k.Value, ctx));
                return Builtins.ApplyFilter(f.Name, v, args, kwargs, ctx.Source, f.Line);
            }
            case Test t:
            {
                var v = Eval(t.Value, ctx);
                var args = t.Args.Select(a => Eval(a, ctx)).ToList();
                return Builtins.ApplyTest(t.Name, v, args, ctx.Source, t.Line) != t.Negated;
            }
            case Unary u:
            {
                var v = Eval(u.Operand, ctx);
                return u.Op switch
                {
                    "not" => !Builtins.Truthy(v),
                    "-" => v switch { long x => (object)(-x), double x => -x, _ => throw ctx.Error(u.Line, $"cannot negate {Builtins.TypeName(v)}") },
                    _ => v,
                };
            }
            case Binary b:
            {
                if (b.Op == "and") { var l = Eval(b.Left, ctx); return Builtins.Truthy(l) ? Eval(b.Right, ctx) : l; }
                if (b.Op == "or") { var l = Eval(b.Left, ctx); return Builtins.Truthy(l) ? l : Eval(b.Right, ctx); }
                return Builtins.BinaryOp(b.Op, Eval(b.Left, ctx), Eval(b.Right, ctx), ctx.Source, b.Line);
            }
            case CondExpr c:
                return Builtins.Truthy(Eval(c.Cond, ctx)) ? Eval(c.Then, ctx) : c.Else is null ? JinjaUndefined.Instance : Eval(c.Else, ctx);
            default:
                throw ctx.Error(e.Line, $"unsupported expression {e.GetType().Name}");
        }
    }

    private static string Describe(Expr e) => e switch
    {
        Name n => $"'{n.Id}'",
        GetAttr g => $"'.{g.Attr}'",
        _ => "the expression",
    };
}
