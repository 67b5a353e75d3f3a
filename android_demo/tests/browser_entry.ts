/** The golden-vector checks as a script for a Chromium page (scripts/browser-tests.mjs injects it). */
import { runFuzz, runVectorChecks } from "./vector_checks.js";

(globalThis as unknown as { nmoeChecks: unknown }).nmoeChecks = { runVectorChecks, runFuzz };
