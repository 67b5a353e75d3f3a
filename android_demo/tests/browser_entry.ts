/** The golden-vector checks as a script for a Chromium page (scripts/browser-tests.mjs injects it). */
import { runTrainingChecks, runTrainingFuzz } from "./training_checks.js";
import { runFuzz, runVectorChecks } from "./vector_checks.js";

(globalThis as unknown as { nmoeChecks: unknown }).nmoeChecks = { runVectorChecks, runFuzz, runTrainingChecks, runTrainingFuzz };
