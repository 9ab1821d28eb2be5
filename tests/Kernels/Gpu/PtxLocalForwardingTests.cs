using FineTuneNative.Kernels.Gpu;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>The PTX pass that removes ILGPU's inline-asm local round trips, on hand-written PTX (the real kernels go through ptxas in PtxasTests).</summary>
public class PtxLocalForwardingTests
{
    private const string Header = "\t.local .align 4 .b8 __local_depot0[4];\n\t.local .align 4 .b8 __local_depot1[4];\n" +
                                  "\tmov.b64\t%rd1, __local_depot0;\n\tmov.b64\t%rd2, __local_depot1;\n";

    [Fact]
    public void ForwardsWithinABlockAndDeletesDeadDepots()
    {
        string ptx = Header +
                     "\tst.local.b32\t[%rd1], %r1;\n" +
                     "\tld.local.b32\t%r2, [%rd1];\n" +
                     "\tst.local.f32\t[%rd2], 0f00000000;\n" +
                     "\tld.local.f32\t%f1, [%rd2];\n" +
                     "\tadd.f32\t%f2, %f1, %f1;\n";
        string got = PtxLocalForwarding.Rewrite(ptx);
        Assert.Contains("mov.b32\t%r2, %r1;", got);
        Assert.Contains("mov.f32\t%f1, 0f00000000;", got);
        Assert.DoesNotContain("local", got);
        Assert.Contains("add.f32\t%f2, %f1, %f1;", got);
    }

    [Fact]
    public void KeepsLoadsAcrossLabelsRedefinitionsAndTypeChanges()
    {
        string ptx = Header +
                     "\tst.local.b32\t[%rd1], %r1;\n" +
                     "L_1:\n" +
                     "\tld.local.b32\t%r2, [%rd1];\n" +            // another block: kept
                     "\tst.local.b32\t[%rd2], %r3;\n" +
                     "\tadd.s32\t%r3, %r3, 1;\n" +                   // the stored register changes: kept
                     "\tld.local.b32\t%r4, [%rd2];\n";
        string got = PtxLocalForwarding.Rewrite(ptx);
        Assert.Equal(ptx, got);
    }

    [Fact]
    public void LeavesEscapedDepotsAlone()
    {
        string ptx = Header +
                     "\tst.local.b32\t[%rd1], %r1;\n" +
                     "\tld.local.b32\t%r2, [%rd1];\n" +
                     "\tadd.s64\t%rd3, %rd1, 0;\n" +               // the address escapes: nothing about depot0 may change
                     "\t@%p1 st.local.b32\t[%rd2], %r5;\n" +        // a predicated store: depot1 untouched too
                     "\tld.local.b32\t%r6, [%rd2];\n";
        Assert.Equal(ptx, PtxLocalForwarding.Rewrite(ptx));
    }

    [Fact]
    public void AddsLaunchBoundsBeforeTheEntryBody()
    {
        const string ptx = ".visible .entry Kernel_X(\n\t.param .u32 a\n)\n{\n\tret;\n}\n";
        Assert.Equal(".visible .entry Kernel_X(\n\t.param .u32 a\n)\n.maxntid 256, 1, 1\n.minnctapersm 2\n{\n\tret;\n}\n",
            PtxLocalForwarding.AddLaunchBounds(ptx, 256, 2));
    }
}
