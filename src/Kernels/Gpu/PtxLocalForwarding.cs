using System.Text;
using System.Text.RegularExpressions;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// A PTX pass that removes the local-memory round trips ILGPU 1.5.3 wraps around inline assembly: every
/// <c>CudaAsm.Emit*</c> operand is a local variable whose address is taken, so each output becomes
/// <c>st.local [d], %r; ld.local %s, [d]</c> and each input a store and a load before the instruction. ptxas
/// forwards the loads but keeps the stores (the tensor-core matmul had a 1040-byte stack frame and 428 LDL/STL in
/// its SASS). Within a basic block, a load from a depot whose last store is known becomes a <c>mov</c>; then the
/// stores, address moves and declarations of depots that no load reads any more are deleted.
/// </summary>
/// <remarks>
/// Conservative by construction: a depot whose address register is used by anything but a plain (unpredicated)
/// <c>st.local</c>/<c>ld.local</c> is left untouched; a label or branch forgets every known value; a line that
/// mentions a stored value's register (it may redefine it) forgets that value; a load is forwarded only from a
/// store of the same type. ptxas assembles the result in PtxasTests (which records stack frame and LDL/STL).
/// </remarks>
public static class PtxLocalForwarding
{
    private static readonly Regex Decl = new(@"^\s*\.local\s+\.align\s+\d+\s+\.b8\s+(__local_depot\d+)\[\d+\];\s*$", RegexOptions.Compiled);
    private static readonly Regex Def = new(@"^\s*mov\.b64\s+(%rd\d+),\s*(__local_depot\d+);\s*$", RegexOptions.Compiled);
    private static readonly Regex Store = new(@"^\s*st\.local\.(\w+)\s+\[(%rd\d+)\],\s*([^;\s]+);\s*$", RegexOptions.Compiled);
    private static readonly Regex Load = new(@"^\s*ld\.local\.(\w+)\s+(%\w+),\s*\[(%rd\d+)\];\s*$", RegexOptions.Compiled);
    private static readonly Regex Label = new(@"^\s*[A-Za-z_$][\w$]*:\s*$", RegexOptions.Compiled);
    private static readonly Regex Branch = new(@"\b(bra|ret|exit|call)\b", RegexOptions.Compiled);
    private static readonly Regex Register = new(@"%\w+", RegexOptions.Compiled);

    public static string Rewrite(string ptx)
    {
        var lines = ptx.Split('\n');
        // depot address registers: defined once by mov.b64 from a depot and used only by plain st/ld.local
        var defCount = new Dictionary<string, int>();
        var depotOf = new Dictionary<string, string>();
        foreach (var line in lines)
        {
            var d = Def.Match(line);
            if (!d.Success) continue;
            defCount[d.Groups[1].Value] = defCount.GetValueOrDefault(d.Groups[1].Value) + 1;
            depotOf[d.Groups[1].Value] = d.Groups[2].Value;
        }
        var candidates = depotOf.Keys.Where(r => defCount[r] == 1).ToHashSet();
        var depotRegisters = new Dictionary<string, int>();
        foreach (var r in candidates) depotRegisters[depotOf[r]] = depotRegisters.GetValueOrDefault(depotOf[r]) + 1;
        foreach (var line in lines)
        {
            if (Def.IsMatch(line) || Store.IsMatch(line) || Load.IsMatch(line)) continue;
            foreach (Match m in Register.Matches(line)) candidates.Remove(m.Value);
            foreach (var depot in depotOf.Values.Distinct())
                if (line.Contains(depot, StringComparison.Ordinal) && !Decl.IsMatch(line))
                    candidates.RemoveWhere(r => depotOf[r] == depot);
        }
        // a depot reached through two registers is left alone (the two could alias)
        candidates.RemoveWhere(r => depotRegisters[depotOf[r]] != 1);
        // a stored value that is itself a depot address escapes its depot
        foreach (var line in lines)
        {
            var s = Store.Match(line);
            if (s.Success) candidates.Remove(s.Groups[3].Value);
        }

        // forward within basic blocks
        var known = new Dictionary<string, (string Type, string Value)>();
        for (int i = 0; i < lines.Length; i++)
        {
            string line = lines[i];
            if (Label.IsMatch(line) || Branch.IsMatch(line))
            {
                known.Clear();
                continue;
            }
            var s = Store.Match(line);
            if (s.Success)
            {
                string addr = s.Groups[2].Value;
                if (candidates.Contains(addr)) known[addr] = (s.Groups[1].Value, s.Groups[3].Value);
                continue;
            }
            var l = Load.Match(line);
            if (l.Success)
            {
                string addr = l.Groups[3].Value, type = l.Groups[1].Value, dst = l.Groups[2].Value;
                if (candidates.Contains(addr) && known.TryGetValue(addr, out var v) && v.Type == type)
                    lines[i] = $"\tmov.{type}\t{dst}, {v.Value};";
                Forget(known, dst);
                continue;
            }
            foreach (Match m in Register.Matches(line)) Forget(known, m.Value);
        }

        // delete what no load reads any more
        var read = new HashSet<string>();
        foreach (var line in lines)
        {
            var l = Load.Match(line);
            if (l.Success) read.Add(l.Groups[3].Value);
        }
        var dead = candidates.Where(r => !read.Contains(r)).ToHashSet();
        var deadDepots = dead.Select(r => depotOf[r]).ToHashSet();
        var sb = new StringBuilder(ptx.Length);
        for (int i = 0; i < lines.Length; i++)
        {
            string line = lines[i];
            var s = Store.Match(line);
            if (s.Success && dead.Contains(s.Groups[2].Value)) continue;
            var d = Def.Match(line);
            if (d.Success && dead.Contains(d.Groups[1].Value)) continue;
            var decl = Decl.Match(line);
            if (decl.Success && deadDepots.Contains(decl.Groups[1].Value)) continue;
            sb.Append(line);
            if (i < lines.Length - 1) sb.Append('\n');
        }
        return sb.ToString();
    }

    /// <summary>
    /// Adds <c>.maxntid threads, 1, 1</c> and <c>.minnctapersm minGroups</c> to the entry (ILGPU emits no launch
    /// bounds), so ptxas budgets registers for <paramref name="minGroups"/> resident groups per multiprocessor.
    /// </summary>
    public static string AddLaunchBounds(string ptx, int threads, int minGroups)
    {
        int entry = ptx.IndexOf(".entry ", StringComparison.Ordinal);
        if (entry < 0) throw new ArgumentException("no .entry in the PTX");
        int body = ptx.IndexOf("\n{", entry, StringComparison.Ordinal);
        if (body < 0) throw new ArgumentException("no body after the .entry in the PTX");
        return ptx.Insert(body + 1, $".maxntid {threads}, 1, 1\n.minnctapersm {minGroups}\n");
    }

    private static void Forget(Dictionary<string, (string Type, string Value)> known, string register)
    {
        List<string>? drop = null;
        foreach (var (addr, v) in known)
            if (v.Value == register) (drop ??= new()).Add(addr);
        if (drop is not null) foreach (var a in drop) known.Remove(a);
    }

    private static readonly Regex SharedDecl = new(@"(\.shared\s+\.align\s+)(\d+)(\s+\.b8\s+__shared_alloca0\b)", RegexOptions.Compiled);

    /// <summary>
    /// Raises the declared alignment of the kernel's first shared buffer (<c>__shared_alloca0</c>) to at least
    /// <paramref name="alignment"/> bytes. ILGPU 1.5.3 declares it <c>.align 4</c>; ldmatrix and cp.async need 16-byte
    /// aligned shared addresses, which only the declaration guarantees.
    /// </summary>
    public static string AlignShared(string ptx, int alignment)
    {
        if (!SharedDecl.IsMatch(ptx)) throw new NotSupportedException("no '.shared .align N .b8 __shared_alloca0' declaration in the PTX: ILGPU's shared naming changed");
        return SharedDecl.Replace(ptx, m => m.Groups[1].Value + Math.Max(alignment, int.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture)) + m.Groups[3].Value, 1);
    }
}
